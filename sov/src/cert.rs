//! `sov cert init|issue|list|rotate|revoke`: the cluster CA (see `sov_common::pki`). The CA
//! directory holds the CA key; it stays with the operator, never on a node.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use sov_common::pki::{Ca, CertRequest, NODE_VALIDITY_DAYS};
use sov_common::tls::{NodeIdentity, Role, TlsFiles};

use crate::{CliError, Output};

#[derive(Debug, Args)]
pub struct CaArg {
    /// The CA directory (ca.pem, ca.key, crl.der, registry.json).
    #[arg(long, env = "SOV_CA_DIR")]
    ca: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Create a new cluster CA and its first (empty) CRL.
    Init(CaArg),
    /// Issue a certificate and key into a TLS directory (ca.pem, cert.pem, key.pem, crl.der).
    Issue {
        #[command(flatten)]
        ca: CaArg,
        /// metad, storaged, gateway, vhost-blk or admin.
        #[arg(long)]
        role: Role,
        /// The holder's name (a storage node's id).
        #[arg(long)]
        name: String,
        /// The holder's zone.
        #[arg(long)]
        zone: Option<String>,
        /// Extra DNS name or IP address (a client-facing endpoint); repeat for more.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = NODE_VALIDITY_DAYS)]
        days: i64,
        /// The TLS directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Every certificate the CA issued, with its serial and state.
    List(CaArg),
    /// Replace the certificate in a TLS directory with a new one for the same identity; a
    /// running daemon picks it up within a second, without a restart.
    Rotate {
        #[command(flatten)]
        ca: CaArg,
        /// The TLS directory to renew.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP address, as at issue.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = NODE_VALIDITY_DAYS)]
        days: i64,
        /// Also revoke the certificate it replaces.
        #[arg(long)]
        revoke_old: bool,
    },
    /// Revoke a certificate by serial and sign the next CRL; `--push DIR` copies the CRL into
    /// TLS directories (running daemons reload it within a second).
    Revoke {
        #[command(flatten)]
        ca: CaArg,
        /// The serial, as `sov cert list` shows it.
        serial: String,
        /// A TLS directory to copy the new CRL into; repeat for more.
        #[arg(long = "push")]
        push: Vec<PathBuf>,
        /// Publish the CRL in metad (members `host:port,...`), from where every daemon of the
        /// cluster fetches it within seconds; needs the operator's TLS folder (`--tls-dir`).
        #[arg(long, env = "SOV_METAD")]
        metad: Option<String>,
    },
}

fn err(e: anyhow::Error) -> CliError {
    CliError::new(1, format!("{e:#}"))
}

fn current_serial(dir: &Path) -> anyhow::Result<(NodeIdentity, String)> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let f = TlsFiles::in_dir(dir);
    let der = CertificateDer::from_pem_file(&f.cert)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.cert.display()))?;
    Ok((
        NodeIdentity::from_cert(&der)?,
        sov_common::pki::hex_of(&sov_common::tls::cert_serial(&der)?),
    ))
}

pub async fn run(cmd: CertCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        CertCmd::Init(a) => {
            Ca::init(&a.ca).map_err(err)?;
            match out {
                Output::Json => println!("{}", serde_json::json!({"ca": a.ca.join("ca.pem")})),
                Output::Text => println!(
                    "cluster CA created in {} (keep ca.key offline; ca.pem is public)",
                    a.ca.display()
                ),
            }
        }
        CertCmd::Issue {
            ca,
            role,
            name,
            zone,
            dns,
            days,
            out: dir,
        } => {
            let ca = Ca::open(&ca.ca).map_err(err)?;
            let id = NodeIdentity::new(role, zone.as_deref(), &name)
                .map_err(|e| CliError::new(2, format!("{e:#}")))?;
            let req = CertRequest {
                identity: id.clone(),
                extra_names: dns,
                validity_days: days,
            };
            let serial = ca.issue_into(&req, &dir).map_err(err)?;
            print_issued(out, &id, &serial, &dir);
        }
        CertCmd::List(a) => {
            let ca = Ca::open(&a.ca).map_err(err)?;
            let issued = ca.issued().map_err(err)?;
            match out {
                Output::Json => println!("{}", serde_json::to_string(&issued).expect("JSON")),
                Output::Text => {
                    println!(
                        "{:<34} {:<40} {:<12} STATE",
                        "SERIAL", "IDENTITY", "EXPIRES"
                    );
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    for i in issued {
                        let state = match i.revoked_in_crl {
                            Some(n) => format!("revoked (CRL {n})"),
                            None if i.not_after_unix < now => "expired".into(),
                            None => "valid".into(),
                        };
                        println!(
                            "{:<34} {:<40} {:<12} {state}",
                            i.serial,
                            i.identity,
                            format!("{}d", (i.not_after_unix - now) / 86_400)
                        );
                    }
                }
            }
        }
        CertCmd::Rotate {
            ca,
            dir,
            dns,
            days,
            revoke_old,
        } => {
            let ca = Ca::open(&ca.ca).map_err(err)?;
            let (id, old) = current_serial(&dir).map_err(err)?;
            let req = CertRequest {
                identity: id.clone(),
                extra_names: dns,
                validity_days: days,
            };
            let serial = ca.issue_into(&req, &dir).map_err(err)?;
            if revoke_old {
                ca.revoke_hex(&old).map_err(err)?;
                ca.copy_crl_into(&dir).map_err(err)?;
            }
            print_issued(out, &id, &serial, &dir);
        }
        CertCmd::Revoke {
            ca,
            serial,
            push,
            metad,
        } => {
            let ca = Ca::open(&ca.ca).map_err(err)?;
            ca.revoke_hex(&serial.to_ascii_lowercase())
                .map_err(|e| CliError::new(2, format!("{e:#}")))?;
            for d in &push {
                ca.copy_crl_into(d).map_err(err)?;
            }
            if let Some(m) = metad {
                let mc = sov_client::meta::MetaClient::new(&sov_client::meta::parse_addrs(&m))
                    .map_err(crate::cluster::status_err)?;
                let req = sov_proto::metad::PublishCrlRequest {
                    der: ca.crl_der().map_err(err)?.into(),
                    number: ca.crl_number().map_err(err)?,
                };
                mc.call(|mut c| {
                    let req = req.clone();
                    async move { c.publish_crl(req).await }
                })
                .await
                .map_err(crate::cluster::status_err)?;
            }
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"revoked": serial, "crl": ca.dir().join("crl.der")})
                ),
                Output::Text => println!(
                    "revoked {serial}; new CRL in {} (copied to {} TLS directories)",
                    ca.dir().join("crl.der").display(),
                    push.len()
                ),
            }
        }
    }
    Ok(())
}

fn print_issued(out: Output, id: &NodeIdentity, serial: &str, dir: &Path) {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::json!({"identity": id.uri(), "serial": serial, "dir": dir})
        ),
        Output::Text => println!("issued {id} serial {serial} into {}", dir.display()),
    }
}
