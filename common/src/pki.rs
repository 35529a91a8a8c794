//! The cluster CA: creates the CA, issues node and operator certificates, keeps the list of
//! what it issued and revoked, and signs CRLs. Used by the `sov` CLI (`sov cert ...`, `sov
//! up`) and the test harness; daemons only read what it writes (see [`crate::tls`]).
//!
//! A CA directory holds `ca.pem`, `ca.key` (0600), `crl.der` (the newest CRL) and
//! `registry.json` (every certificate issued, with its identity, serial and expiry, and the
//! revoked serials with the CRL number that revoked them). The CA key never leaves it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::tls::{NodeIdentity, Role, check_private, write_private};

/// How long node certificates are valid unless asked otherwise.
pub const NODE_VALIDITY_DAYS: i64 = 90;
const CA_VALIDITY_DAYS: i64 = 3650;

/// One certificate the CA issued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Issued {
    pub serial: String,
    pub identity: String,
    pub not_after_unix: i64,
    pub issued_unix: i64,
    /// The CRL number that revoked it.
    #[serde(default)]
    pub revoked_in_crl: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Registry {
    crl_number: u64,
    issued: Vec<Issued>,
}

/// What to put in a certificate.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub identity: NodeIdentity,
    /// Extra DNS names and IP addresses (client-facing endpoints: the S3 gateway's host name).
    pub extra_names: Vec<String>,
    pub validity_days: i64,
}

impl CertRequest {
    pub fn node(identity: NodeIdentity) -> CertRequest {
        CertRequest {
            identity,
            extra_names: Vec::new(),
            validity_days: NODE_VALIDITY_DAYS,
        }
    }
}

/// An open CA directory.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "sov cluster CA");
    p.distinguished_name.push(DnType::OrganizationName, "sov");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    // Positive and of full length when DER-encoded.
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Ca {
    /// Creates a new CA in `dir` (which must not hold one yet) with an empty CRL number 1.
    pub fn init(dir: &Path) -> anyhow::Result<Ca> {
        if dir.join("ca.key").exists() {
            bail!("{} already holds a CA", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut p = ca_params();
        p.not_before = now() - Duration::hours(1);
        p.not_after = now() + Duration::days(CA_VALIDITY_DAYS);
        p.serial_number = Some(random_serial());
        let cert = p.self_signed(&key).context("signing the CA certificate")?;
        write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join("ca.pem"), cert.pem())?;
        let ca = Ca {
            dir: dir.to_path_buf(),
            key,
        };
        ca.save(&Registry::default())?;
        ca.sign_crl()?;
        Ok(ca)
    }

    /// Opens an existing CA directory; refuses a CA key that others may read.
    pub fn open(dir: &Path) -> anyhow::Result<Ca> {
        let kp = dir.join("ca.key");
        check_private(&kp)?;
        let pem = std::fs::read_to_string(&kp)
            .with_context(|| format!("cannot read {}", kp.display()))?;
        let key = KeyPair::from_pem(&pem).context("the CA key does not parse")?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn registry(&self) -> anyhow::Result<Registry> {
        let p = self.dir.join("registry.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} does not parse", p.display()))
    }

    fn save(&self, r: &Registry) -> anyhow::Result<()> {
        let p = self.dir.join("registry.json");
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    /// The number of the newest CRL.
    pub fn crl_number(&self) -> anyhow::Result<u64> {
        Ok(self.registry()?.crl_number)
    }

    /// The newest CRL (DER).
    pub fn crl_der(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(self.dir.join("crl.der")).context("reading the CRL")
    }

    /// Every certificate issued so far.
    pub fn issued(&self) -> anyhow::Result<Vec<Issued>> {
        Ok(self.registry()?.issued)
    }

    /// Issues a certificate and its new key; returns (certificate PEM, key PEM, serial hex).
    pub fn issue(&self, req: &CertRequest) -> anyhow::Result<(String, String, String)> {
        let id = &req.identity;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, id.name.as_str());
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, id.role.as_str());
        let mut sans = vec![
            SanType::URI(id.uri().try_into()?),
            SanType::DnsName(id.role.dns_name().try_into()?),
            SanType::DnsName(format!("{}.{}", id.name, id.role.dns_name()).try_into()?),
        ];
        for n in &req.extra_names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .with_context(|| format!("bad DNS name {n:?}"))?,
                ),
            });
        }
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match id.role {
            Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        p.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        let serial_hex = hex_of(serial.as_ref());
        p.serial_number = Some(serial);
        let not_after = now() + Duration::days(req.validity_days);
        p.not_before = now() - Duration::minutes(5);
        p.not_after = not_after;
        let key = KeyPair::generate().context("generating a key")?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = p.signed_by(&key, &issuer).context("signing")?;
        let mut r = self.registry()?;
        r.issued.push(Issued {
            serial: serial_hex.clone(),
            identity: id.uri(),
            not_after_unix: not_after.unix_timestamp(),
            issued_unix: now().unix_timestamp(),
            revoked_in_crl: None,
        });
        self.save(&r)?;
        Ok((cert.pem(), key.serialize_pem(), serial_hex))
    }

    /// Issues into a TLS directory for a daemon or the CLI: `ca.pem`, `cert.pem`, `key.pem`
    /// (0600) and the current `crl.der`. Replaces what was there (rotation); returns the serial.
    pub fn issue_into(&self, req: &CertRequest, dir: &Path) -> anyhow::Result<String> {
        let (cert, key, serial) = self.issue(req)?;
        std::fs::create_dir_all(dir)?;
        std::fs::copy(self.ca_pem_path(), dir.join("ca.pem"))?;
        // The key first, then the certificate: a reader that sees the new certificate also
        // finds its key.
        write_private(&dir.join("key.pem"), key.as_bytes())?;
        let tmp = dir.join("cert.pem.tmp");
        std::fs::write(&tmp, cert)?;
        std::fs::rename(&tmp, dir.join("cert.pem"))?;
        self.copy_crl_into(dir)?;
        Ok(serial)
    }

    /// Copies the newest CRL into a TLS directory.
    pub fn copy_crl_into(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join("crl.der.tmp");
        std::fs::copy(self.dir.join("crl.der"), &tmp)?;
        std::fs::rename(&tmp, dir.join("crl.der"))?;
        Ok(())
    }

    /// Revokes a serial (raw bytes or as listed) and signs the next CRL; returns its DER.
    pub fn revoke(&self, serial: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.revoke_hex(&hex_of(serial))
    }

    /// Revokes the certificate with this serial (hex, as `sov cert list` shows it).
    pub fn revoke_hex(&self, serial_hex: &str) -> anyhow::Result<Vec<u8>> {
        let mut r = self.registry()?;
        let next = r.crl_number + 1;
        let Some(i) = r.issued.iter_mut().find(|i| i.serial == serial_hex) else {
            bail!("this CA issued no certificate with serial {serial_hex}");
        };
        if i.revoked_in_crl.is_none() {
            i.revoked_in_crl = Some(next);
        }
        self.save(&r)?;
        self.sign_crl()
    }

    /// Signs a CRL with the next number listing every revoked serial; writes `crl.der`.
    pub fn sign_crl(&self) -> anyhow::Result<Vec<u8>> {
        let mut r = self.registry()?;
        r.crl_number += 1;
        let revoked_certs = r
            .issued
            .iter()
            .filter(|i| i.revoked_in_crl.is_some())
            .map(|i| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&i.serial)?),
                    revocation_time: now(),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update: now() - Duration::minutes(5),
            next_update: now() + Duration::days(365),
            crl_number: SerialNumber::from_slice(&r.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::new(ca_params(), &self.key);
        let crl = params.signed_by(&issuer).context("signing the CRL")?;
        let der = crl.der().to_vec();
        let p = self.dir.join("crl.der");
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, &der)?;
        std::fs::rename(&tmp, &p)?;
        self.save(&r)?;
        Ok(der)
    }
}

pub fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("bad serial {s:?}");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| anyhow::anyhow!("bad serial {s:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{NodeIdentity, TlsContext, cert_serial};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn issued_certificates_carry_identity_and_serial_and_revocation_is_recorded() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("ca")).unwrap();
        assert!(
            Ca::init(&t.path().join("ca")).is_err(),
            "a second init overwrote the CA"
        );
        let id = NodeIdentity::new(Role::Storaged, Some("a"), "n1").unwrap();
        let serial = ca
            .issue_into(&CertRequest::node(id.clone()), &t.path().join("n1"))
            .unwrap();
        let ctx = TlsContext::load(&t.path().join("n1")).unwrap();
        assert_eq!(ctx.identity(), &id);
        let der = CertificateDer::from_pem_file(t.path().join("n1/cert.pem")).unwrap();
        assert_eq!(hex_of(&cert_serial(&der).unwrap()), serial);
        let ca = Ca::open(&t.path().join("ca")).unwrap();
        ca.revoke_hex(&serial).unwrap();
        assert!(ca.revoke_hex("00ff").is_err());
        let listed = ca.issued().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].revoked_in_crl, Some(2));
        // The key files are private, and a widened one is refused.
        use std::os::unix::fs::PermissionsExt;
        let key = t.path().join("n1/key.pem");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TlsContext::load(&t.path().join("n1")).unwrap_err();
        assert!(format!("{e:#}").contains("group or others"), "{e:#}");
    }
}
