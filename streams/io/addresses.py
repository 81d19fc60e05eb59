"""Which network addresses a worker may fetch listing images from: the SSRF guard's classifier.

A listing names its image by URL, and whoever writes listings chooses that URL, so a worker must
not become a way to reach what only the worker can reach: its own loopback, the private network
around it, link-local addresses and above all the cloud metadata services (credentials live
there). :func:`refusal` says why an address is refused, or ``None`` for a public unicast address.
Addresses that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, the
NAT64 prefix ``64:ff9b::/96``) are judged by the IPv4 address they carry.

The check is made on the *resolved* addresses, never on the host name, and the fetcher connects
to exactly the addresses it checked (``streams/io/images.py``), so a name that resolves to a
public address for the check and a private one for the connection (DNS rebinding) cannot slip
through. Hosts listed in ``SAMESTYLE_IMAGE_ALLOWED_HOSTS`` skip the check (an image server on the
private network, the tests' loopback server); cloud metadata addresses are refused even then.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

Address = IPv4Address | IPv6Address

#: Cloud instance metadata and platform endpoints: AWS/GCP/Azure/OCI/OpenStack 169.254.169.254,
#: AWS ECS task metadata 169.254.170.2, AWS DNS / time sync 169.254.169.253 and .123, Alibaba
#: 100.100.100.200, Azure's wire server 168.63.129.16 (a public address, hence listed), AWS's
#: IPv6 metadata endpoints fd00:ec2::254 and fd00:ec2::23. Most also fall in a refused range; they
#: are named so that the reason says what they are and so that no allow-list can open them.
METADATA_ADDRESSES: frozenset[Address] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "169.254.169.123",
    "100.100.100.200", "168.63.129.16", "fd00:ec2::254", "fd00:ec2::23",
))

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_metadata(address: Address) -> bool:
    """Whether ``address`` is (or carries) a cloud metadata address."""
    if isinstance(address, IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return inner in METADATA_ADDRESSES
    return address in METADATA_ADDRESSES


def refusal(address: Address | str) -> str | None:
    """Why a worker must not connect to ``address``, or ``None`` when it is a public unicast address.

    The reason reads as the end of a sentence: ``"127.0.0.1 is a loopback address"``.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            why = refusal(inner)
            return None if why is None else f"{ip} carries IPv4 {why}"
        if ip.scope_id:  # fe80::1%eth0
            return f"{ip} is a link-local address (with a zone)"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    for test, kind in ((ip.is_unspecified, "an unspecified"), (ip.is_loopback, "a loopback"),
                       (ip.is_link_local, "a link-local"), (ip.is_multicast, "a multicast"),
                       (ip.is_private, "a private"), (ip.is_reserved, "a reserved")):
        if test:
            return f"{ip} is {kind} address"
    if not ip.is_global:  # e.g. 100.64.0.0/10, shared address space (carrier-grade NAT)
        return f"{ip} is not a globally routable address"
    return None


def normalise_host(host: str) -> str:
    """A host as the allow-list compares it: lower case, no trailing dot, no IPv6 brackets, and an
    IP address in its compressed form (so ``[0:0::1]`` and ``::1`` are one entry)."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_allowed_hosts(raw: str) -> frozenset[str]:
    """``SAMESTYLE_IMAGE_ALLOWED_HOSTS``: comma-separated host names or IP addresses (no ports, no
    wildcards: each entry opens exactly one host)."""
    hosts = set()
    for entry in raw.split(","):
        if not entry.strip():
            continue
        host = normalise_host(entry)
        if any(c in host for c in "*/:@ ") and not _is_ip(host):
            raise ValueError(f"image allowed host {entry.strip()!r} is not a host name or an IP address "
                             "(no ports, paths or wildcards)")
        hosts.add(host)
    return frozenset(hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = ["METADATA_ADDRESSES", "embedded_ipv4", "is_metadata", "normalise_host", "parse_allowed_hosts",
           "refusal"]
