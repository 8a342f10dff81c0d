//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>, contract §11).
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the signature is its
//! HMAC-SHA256 under the endpoint's key, base64-encoded and prefixed `v1,`. The key is shown to
//! admins as `whsec_` + base64 of its bytes and stored as the base64 part. While a rotated-out
//! key is still valid, `webhook-signature` carries one signature per key, separated by spaces,
//! and a receiver accepts the message when any of them verifies.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature of one message under one key: `v1,<base64 of the HMAC-SHA256>`.
///
/// # Errors
/// `key_base64` is not base64 (a row written by hand).
pub fn sign(
    key_base64: &str,
    message_id: &str,
    timestamp: i64,
    body: &str,
) -> Result<String, base64::DecodeError> {
    let key = STANDARD.decode(key_base64)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` header: one signature per key in `keys` (base64), space-separated.
///
/// # Errors
/// A key that is not base64.
pub fn header(
    keys: &[&str],
    message_id: &str,
    timestamp: i64,
    body: &str,
) -> Result<String, base64::DecodeError> {
    let signatures = keys
        .iter()
        .map(|k| sign(k, message_id, timestamp, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference libraries.
    #[test]
    fn signs_the_specifications_example() {
        let key = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"; // whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
        let signature = sign(
            key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn two_keys_give_two_signatures() {
        let h = header(&["AAAA", "BBBB"], "msg_1", 1, "{}").unwrap();
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
        assert!(sign("not base64!", "m", 1, "{}").is_err());
    }
}
