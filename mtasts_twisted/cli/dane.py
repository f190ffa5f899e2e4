"""
C{mtasts-twisted lookup DOMAIN --dane}: per MX host, what DANE (RFC 7672)
says of it and which policy decides delivery to it, as the relay's
L{Deliverer<mtasts_twisted.delivery.Deliverer>} with C{--dane} would
decide (L{plan_host<mtasts_twisted.delivery.plan_host>}).

The JSON form (the C{dane} member of C{lookup --json}), documented in
README.rst::

    {"mx_secure": true, "error": null, "hosts": [
        {"host": "mx.example.com", "preference": 10,
         "state": "secure-usable",      # secure-unusable, none, insecure, bogus
         "base_domain": "mx.example.com", "tlsa_name": "_25._tcp.mx.example.com",
         "records": ["3 1 1 ab…"], "usable": ["3 1 1 ab…"], "detail": "…",
         "decided_by": "dane",          # mta-sts, or none (opportunistic)
         "action": "require-dane"}]}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from mtasts_twisted.interfaces import IDNSResolver
    from mtasts_twisted.policy import Policy

__all__ = ["DANE_STATE_TEXT", "lookup_dane", "write_dane"]

#: What each DANE state means for delivery, for the text output.
DANE_STATE_TEXT = {
    "secure-usable": "secure TLSA, usable: TLS authenticated by the TLSA records, or no delivery",
    "secure-unusable": "secure TLSA, none usable: TLS required, not authenticated",
    "none": "no TLSA records (secure denial): DANE does not apply",
    "insecure": "not DNSSEC-secure: DANE does not apply",
    "bogus": "DANE lookup failed (bogus or indeterminate): delivery deferred",
}


async def lookup_dane(resolver: IDNSResolver, domain: str, policy: Policy | None, port: int = 25) -> dict[str, Any]:
    """
    The DANE status of every MX host of C{domain} and the decision per host.

    @param policy: the domain's MTA-STS policy (for the decision), or L{None}.
    @param port: the SMTP port (the TLSA names' C{_PORT} label).
    @return: the JSON-ready object of the module docstring; C{error} is
        the text of a failed MX lookup (then C{hosts} is empty).
    """
    from mtasts_twisted.dane import DANEState, DANEStatus, discover_dane
    from mtasts_twisted.delivery import plan_host
    from mtasts_twisted.delivery.danehost import DANE_ACTIONS
    from mtasts_twisted.dns import DNSError, DNSNoRecordError
    from mtasts_twisted.policy import Mode

    try:
        mx = await resolver.lookup_mx(domain)
    except DNSNoRecordError as e:
        return {"mx_secure": bool(e.secure), "error": f"no MX: {e}", "hosts": [], "temporary": False}
    except DNSError as e:
        return {"mx_secure": False, "error": f"MX lookup failed: {e}", "hosts": [], "temporary": True}
    hosts = []
    for host in mx.hosts:
        try:
            status = await discover_dane(resolver, host.host, mx_secure=mx.secure, port=port)
        except DNSNoRecordError as e:
            status = DANEStatus(host.host, DANEState.NONE, port, detail=f"no addresses: {e}")
        target = plan_host(policy, host, status)
        if target.action in DANE_ACTIONS:
            decided_by = "dane"
        elif policy is not None and policy.mode is not Mode.NONE:
            decided_by = "mta-sts"
        else:
            decided_by = "none"
        hosts.append({
            "host": host.host,
            "preference": host.preference,
            "state": status.state.value,
            "base_domain": status.base_domain,
            "tlsa_name": status.tlsa_name,
            "records": [r.to_text() for r in status.records],
            "usable": [r.to_text() for r in status.usable],
            "detail": status.detail or None,
            "decided_by": decided_by,
            "action": target.action.value,
        })
    return {"mx_secure": mx.secure, "error": None, "hosts": hosts, "temporary": False}


def write_dane(out: TextIO, dane: dict[str, Any]) -> None:
    """The text form of L{lookup_dane}'s object: one line per MX host, and its records."""
    if dane["error"]:
        out.write(f"  DANE: {dane['error']}\n")
        return
    if not dane["mx_secure"]:
        out.write("  DANE: the MX RRset is not DNSSEC-secure: DANE does not apply (RFC 7672 §2.2.1)\n")
    for host in dane["hosts"]:
        out.write(f"  DANE {host['host']} (preference {host['preference']}): {DANE_STATE_TEXT[host['state']]}; "
                  f"decided by {host['decided_by']} ({host['action']})\n")
        for record in host["records"]:
            mark = "usable" if record in host["usable"] else "unusable"
            out.write(f"    {host['tlsa_name']} TLSA {record} ({mark})\n")
