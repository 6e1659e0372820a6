//! ACME challenge answers, the data-plane half of automatic certificates.
//!
//! The ACME manager (in `vhost-server`) publishes what the CA will ask for here before telling
//! the CA a challenge is ready, and withdraws it when the order ends:
//! - HTTP-01: the key authorization of each token, answered by [`crate::VhostProxy`] at
//!   `/.well-known/acme-challenge/<token>` for every host, before routing and redirects;
//! - TLS-ALPN-01 (RFC 8737): a self-signed certificate per domain carrying the
//!   `acmeIdentifier` extension, presented by [`crate::SniCertResolver`] to clients that
//!   negotiate the `acme-tls/1` protocol (the connection then closes without HTTP).
//!
//! Both maps are copy-on-write snapshots (one [`ArcSwap`] each): the request path and the
//! handshake take no lock; the single writer replaces the map.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;
use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509Extension, X509NameBuilder, X509};

use crate::certs::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Path prefix of HTTP-01 challenges (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// OID of the `acmeIdentifier` certificate extension (RFC 8737 §6.1).
const ACME_IDENTIFIER_OID: &str = "1.3.6.1.5.5.7.1.31";

/// The pending challenges (see the module docs).
#[derive(Debug, Default)]
pub struct AcmeChallenges {
    http: ArcSwap<HashMap<Box<str>, Arc<str>, RandomState>>,
    tls_alpn: ArcSwap<HashMap<Box<str>, Arc<CertifiedKey>, RandomState>>,
}

/// A TLS-ALPN-01 challenge certificate could not be made (OpenSSL failed).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS-ALPN-01 certificate for {domain}: {source}")]
pub struct ChallengeCertError {
    /// The domain being validated.
    pub domain: String,
    /// OpenSSL's error.
    pub source: openssl::error::ErrorStack,
}

impl AcmeChallenges {
    /// The key authorization to answer for an HTTP-01 `token`.
    pub fn http01(&self, token: &str) -> Option<Arc<str>> {
        self.http.load().get(token).cloned()
    }

    /// Answers `token` with `key_authorization` until [`AcmeChallenges::remove_http01`].
    pub fn add_http01(&self, token: &str, key_authorization: &str) {
        let value: Arc<str> = key_authorization.into();
        self.http.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.insert(token.into(), Arc::clone(&value));
            next
        });
    }

    /// Stops answering `token`.
    pub fn remove_http01(&self, token: &str) {
        self.http.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.remove(token);
            next
        });
    }

    /// The challenge certificate of `domain` (the client's SNI), if one is pending.
    pub fn tls_alpn_certificate(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.tls_alpn.load();
        if map.is_empty() {
            return None;
        }
        map.get(sni.to_ascii_lowercase().trim_end_matches('.'))
            .cloned()
    }

    /// Presents a TLS-ALPN-01 certificate for `domain` proving `digest` (the SHA-256 of the key
    /// authorization) until [`AcmeChallenges::remove_tls_alpn01`].
    pub fn add_tls_alpn01(&self, domain: &str, digest: &[u8]) -> Result<(), ChallengeCertError> {
        let ck = Arc::new(challenge_certificate(domain, digest).map_err(|source| {
            ChallengeCertError {
                domain: domain.to_owned(),
                source,
            }
        })?);
        self.tls_alpn.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.insert(domain.into(), Arc::clone(&ck));
            next
        });
        Ok(())
    }

    /// Stops presenting the challenge certificate of `domain`.
    pub fn remove_tls_alpn01(&self, domain: &str) {
        self.tls_alpn.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.remove(domain);
            next
        });
    }

    /// Number of pending challenges (HTTP-01 tokens, TLS-ALPN-01 domains).
    pub fn pending(&self) -> (usize, usize) {
        (self.http.load().len(), self.tls_alpn.load().len())
    }
}

/// A self-signed P-256 certificate for `domain` with the critical `acmeIdentifier` extension
/// holding `digest` as a DER OCTET STRING (RFC 8737 §3).
fn challenge_certificate(
    domain: &str,
    digest: &[u8],
) -> Result<CertifiedKey, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "ACME TLS-ALPN-01 challenge")?;
    let name = name.build();
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(&name)?;
    builder.set_pubkey(&key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(7)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    let san = SubjectAlternativeName::new()
        .dns(domain)
        .build(&builder.x509v3_context(None, None))?;
    builder.append_extension(san)?;
    // extnValue = DER of OCTET STRING (SIZE (32)) containing the digest.
    let mut der = Vec::with_capacity(digest.len() + 2);
    der.push(0x04);
    der.push(u8::try_from(digest.len()).unwrap_or(u8::MAX));
    der.extend_from_slice(digest);
    let oid = Asn1Object::from_str(ACME_IDENTIFIER_OID)?;
    let value = Asn1OctetString::new_from_bytes(&der)?;
    builder.append_extension(X509Extension::new_from_der(&oid, true, &value)?)?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok(CertifiedKey::new(vec![builder.build()], key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_tokens_come_and_go() {
        let c = AcmeChallenges::default();
        assert!(c.http01("t1").is_none());
        c.add_http01("t1", "t1.thumb");
        assert_eq!(c.http01("t1").as_deref(), Some("t1.thumb"));
        c.remove_http01("t1");
        assert!(c.http01("t1").is_none());
    }

    #[test]
    fn the_challenge_certificate_carries_the_digest_in_a_critical_extension() {
        let c = AcmeChallenges::default();
        let digest = [7u8; 32];
        c.add_tls_alpn01("shop.example.com", &digest).unwrap();
        let ck = c.tls_alpn_certificate("Shop.Example.com.").unwrap();
        let text = String::from_utf8(ck.leaf().unwrap().to_text().unwrap()).unwrap();
        assert!(text.contains("DNS:shop.example.com"), "{text}");
        assert!(text.contains("1.3.6.1.5.5.7.1.31: critical"), "{text}");
        let der = ck.leaf().unwrap().to_der().unwrap();
        let mut expected = vec![0x04, 0x20];
        expected.extend_from_slice(&digest);
        assert!(
            der.windows(expected.len())
                .any(|w| w == expected.as_slice()),
            "digest not found as an OCTET STRING"
        );
        c.remove_tls_alpn01("shop.example.com");
        assert!(c.tls_alpn_certificate("shop.example.com").is_none());
    }
}
