//! What the api and the webhooks service share about signed webhooks (contract §11): the event
//! types an endpoint can subscribe to, and which targets an endpoint may point at.
//!
//! **Targets (SSRF).** An endpoint URL is an address the services will send requests to from
//! inside the network. Unless `webhooks.allow_private_targets` is set, a target is refused
//! when its host is, or resolves to, any address that is not public ([`is_public`]): loopback,
//! private, link-local, shared (CGNAT), unspecified, multicast, documentation, benchmarking or
//! reserved, in IPv4 or IPv6 (IPv4-mapped included). The api checks when an endpoint is
//! registered; the webhooks service checks again at every delivery, on the addresses it
//! actually connects to, so that a name re-pointed to an internal address later is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// Every event type an endpoint can subscribe to, with what it means.
pub const EVENT_TYPES: &[(&str, &str)] = &[
    (
        "earning.created",
        "a commission was credited (an earning event of kind `commission`)",
    ),
    (
        "earning.reversed",
        "a commission was clawed back by a refund (kind `reversal`)",
    ),
    (
        "earning.approved",
        "a commission's holding period ended (kind `approval`)",
    ),
    (
        "earning.paid",
        "an approved balance was paid out (kind `payout`)",
    ),
    (
        "purchase.processed",
        "a purchase was recorded and its commissions credited",
    ),
    (
        "purchase.rejected",
        "a purchase was recorded as rejected, with its reason",
    ),
];

/// Whether `name` is one of [`EVENT_TYPES`].
pub fn is_event_type(name: &str) -> bool {
    EVENT_TYPES.iter().any(|(t, _)| *t == name)
}

/// The webhook event type of an earning event's `kind` (contract §4, §10).
pub fn earning_event_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "commission" => "earning.created",
        "reversal" => "earning.reversed",
        "approval" => "earning.approved",
        "payout" => "earning.paid",
        _ => return None,
    })
}

/// Why a target was refused, for the api's 422 and a delivery attempt's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an absolute `http` or `https` URL with a host, or with credentials in it.
    #[error("{0}")]
    Invalid(String),
    /// The host is or resolves to a non-public address.
    #[error("{host} is {address}, which is not a public address (set webhooks.allow_private_targets = true to allow it)")]
    NotPublic { host: String, address: IpAddr },
    /// The host name does not resolve.
    #[error("{host} does not resolve: {reason}")]
    Unresolvable { host: String, reason: String },
}

/// Parses an endpoint URL: absolute, `http` or `https`, with a host, without user info or a
/// fragment, at most `max_bytes` long.
///
/// # Errors
/// [`TargetError::Invalid`] saying what is wrong.
pub fn parse_target(raw: &str, max_bytes: usize) -> Result<Url, TargetError> {
    if raw.len() > max_bytes {
        return Err(TargetError::Invalid(format!(
            "must be at most {max_bytes} bytes (webhooks.max_url_bytes)"
        )));
    }
    let url = Url::parse(raw.trim())
        .map_err(|e| TargetError::Invalid(format!("is not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Invalid(format!(
            "must be http:// or https://, not {}://",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(TargetError::Invalid("has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Invalid(
            "must not carry credentials; the signature authenticates the sender".into(),
        ));
    }
    if url.fragment().is_some() {
        return Err(TargetError::Invalid("must not have a #fragment".into()));
    }
    Ok(url)
}

/// Checks that every address `url`'s host resolves to is public (or that private ones are
/// allowed), resolving names with the system resolver.
///
/// # Errors
/// [`TargetError::NotPublic`] naming the first non-public address, or
/// [`TargetError::Unresolvable`].
pub async fn check_target(url: &Url, allow_private: bool) -> Result<(), TargetError> {
    if allow_private {
        return Ok(());
    }
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(443);
    let addresses: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        _ => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| TargetError::Unresolvable {
                host: host.to_owned(),
                reason: e.to_string(),
            })?
            .map(|a| a.ip())
            .collect(),
    };
    match addresses.into_iter().find(|a| !is_public(*a)) {
        Some(address) => Err(TargetError::NotPublic {
            host: host.to_owned(),
            address,
        }),
        None => Ok(()),
    }
}

/// Whether `ip` is a public unicast address: not loopback, private (RFC 1918, IPv6 unique
/// local), link-local, shared (RFC 6598), unspecified, multicast, broadcast, documentation,
/// benchmarking (RFC 2544) or otherwise reserved. IPv4-mapped and IPv4-compatible IPv6
/// addresses are judged as their IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4() {
                return is_public_v4(v4);
            }
            is_public_v6(v6)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space, RFC 6598
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking, RFC 2544
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64, maps to IPv4 inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "1.1.1.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn targets_must_be_plain_http_urls() {
        assert!(parse_target("https://example.com/hook", 2048).is_ok());
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "https://user:pw@example.com/",
            "https://example.com/#x",
        ] {
            assert!(parse_target(bad, 2048).is_err(), "{bad}");
        }
        assert!(parse_target(&format!("https://e.com/{}", "a".repeat(100)), 50).is_err());
    }

    #[tokio::test]
    async fn loopback_targets_are_refused_unless_allowed() {
        let url = parse_target("http://127.0.0.1:9/hook", 2048).unwrap();
        let err = check_target(&url, false).await.unwrap_err();
        assert!(matches!(err, TargetError::NotPublic { .. }), "{err}");
        assert!(err.to_string().contains("allow_private_targets"), "{err}");
        check_target(&url, true).await.unwrap();
        let named = parse_target("http://localhost:9/hook", 2048).unwrap();
        assert!(check_target(&named, false).await.is_err());
    }
}
