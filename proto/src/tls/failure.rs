//! What a failed TLS handshake says about certificates, in words an operator can act on.
//!
//! [`certificate_failure`] looks through an error's whole chain (tonic, hyper and reqwest wrap
//! rustls's error in `io::Error`s, whose `source` skips the error they carry) for rustls's
//! verdict, or for the text of a certificate alert (h2 keeps only the message of an I/O error),
//! and answers only when it is about a certificate: this side refused the peer's
//! ([`CertificateFailure::Refused`], e.g. `UnknownIssuer`), a client sent none where one was
//! required ([`CertificateFailure::NoneSent`]), or the peer refused this side's, or required one
//! that this side did not send ([`CertificateFailure::RefusedByPeer`], a fatal alert). Anything
//! else (a plain-text client, a reset, a version mismatch) is `None`.

use std::error::Error;

use rustls::AlertDescription;

/// A handshake that failed over a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateFailure {
    /// This server asked for a client certificate, required one, and got none.
    NoneSent,
    /// This side refused the peer's certificate; rustls's reason (e.g. `UnknownIssuer`: not
    /// signed by a trusted CA).
    Refused(String),
    /// The peer ended the handshake with this alert: it refused this side's certificate
    /// (`UnknownCA`, `BadCertificate`, ...) or required one that was not sent
    /// (`CertificateRequired`).
    RefusedByPeer(AlertDescription),
}

impl CertificateFailure {
    /// The reason as a server logs it about a client.
    pub fn as_seen_by_server(&self) -> String {
        match self {
            CertificateFailure::NoneSent => "client certificate required: the client presented none".into(),
            CertificateFailure::Refused(reason) => format!("client certificate refused: {reason}"),
            CertificateFailure::RefusedByPeer(alert) => {
                format!("the client refused this server's certificate (alert {alert:?})")
            }
        }
    }

    /// The reason as a client reports it about a server.
    pub fn as_seen_by_client(&self) -> String {
        match self {
            CertificateFailure::NoneSent => "the server presented no certificate".into(),
            CertificateFailure::Refused(reason) => format!("the server's certificate is not trusted: {reason}"),
            CertificateFailure::RefusedByPeer(AlertDescription::CertificateRequired) => {
                "the server requires a client certificate and none was presented".into()
            }
            CertificateFailure::RefusedByPeer(alert) => {
                format!("the server refused the client certificate (alert {alert:?})")
            }
        }
    }

    /// Whether the peer refused this side's certificate (or its lack of one).
    pub fn refused_by_peer(&self) -> bool {
        matches!(self, CertificateFailure::RefusedByPeer(_))
    }
}

/// The certificate problem behind `error`, if that is what ended a handshake.
pub fn certificate_failure(error: &(dyn Error + 'static)) -> Option<CertificateFailure> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(rustls) = current.downcast_ref::<rustls::Error>() {
            return classify(rustls);
        }
        // `io::Error::source` skips the error it wraps: look inside it explicitly.
        if let Some(inner) = current.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref)
            && let Some(failure) = certificate_failure(inner)
        {
            return Some(failure);
        }
        if let Some(alert) = alert_in_text(&current.to_string()) {
            return Some(CertificateFailure::RefusedByPeer(alert));
        }
        next = current.source();
    }
    None
}

fn classify(error: &rustls::Error) -> Option<CertificateFailure> {
    match error {
        rustls::Error::NoCertificatesPresented => Some(CertificateFailure::NoneSent),
        rustls::Error::InvalidCertificate(reason) => Some(CertificateFailure::Refused(reason.to_string())),
        rustls::Error::AlertReceived(alert) if about_certificates(*alert) => {
            Some(CertificateFailure::RefusedByPeer(*alert))
        }
        _ => None,
    }
}

/// The alerts a TLS peer sends about certificates.
const CERTIFICATE_ALERTS: [AlertDescription; 8] = [
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::CertificateRequired,
];

fn about_certificates(alert: AlertDescription) -> bool {
    CERTIFICATE_ALERTS.contains(&alert)
}

/// A certificate alert named in `text` as rustls words a received one.
fn alert_in_text(text: &str) -> Option<AlertDescription> {
    CERTIFICATE_ALERTS.into_iter().find(|alert| text.contains(&rustls::Error::AlertReceived(*alert).to_string()))
}
