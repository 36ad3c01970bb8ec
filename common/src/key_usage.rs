//! The one thing flgfn reads of an X.509 certificate itself: the purposes
//! its extendedKeyUsage extension lists (RFC 5280, 4.2.1.12).
//!
//! rustls checks them only in a handshake, from the peer's side: a
//! learner that serves an actor's client certificate starts, and then
//! every actor's handshake fails, far from the cause. Read when the
//! configuration is read, the file can be named. A short DER walk (no
//! X.509 parser is among the dependencies, and this is all it needs):
//! a certificate laid out otherwise is left to rustls, which judges it.

/// serverAuth (1.3.6.1.5.5.7.3.1), as the contents of its DER OID.
pub const SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
/// clientAuth (1.3.6.1.5.5.7.3.2).
pub const CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];
/// The extension's own id, extendedKeyUsage (2.5.29.37).
const EXTENDED_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];

const SEQUENCE: u8 = 0x30;
const OBJECT_ID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// `[3]`, the tbsCertificate's extensions.
const EXTENSIONS: u8 = 0xa3;

/// One DER element at the start of `input`: its tag, its contents and
/// what follows it (None where it runs past the input).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let bytes = usize::from(first & 0x7f);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let (length, rest) = rest.split_at(bytes);
        let length = length
            .iter()
            .fold(0usize, |sum, &byte| (sum << 8) | usize::from(byte));
        (length, rest)
    };
    (rest.len() >= length).then(|| {
        let (contents, rest) = rest.split_at(length);
        (tag, contents, rest)
    })
}

/// The elements in `contents` (a constructed element's), in order, as
/// (tag, contents); it ends at the first that does not parse.
fn elements(mut contents: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, inner, rest) = element(contents)?;
        contents = rest;
        Some((tag, inner))
    })
}

/// The purposes (each its OID's DER contents) that the extendedKeyUsage
/// of `certificate` (DER) lists; None without the extension (any purpose
/// goes) or where `certificate` is not laid out as one.
pub fn extended_key_usages(certificate: &[u8]) -> Option<Vec<&[u8]>> {
    let (SEQUENCE, certificate, _) = element(certificate)? else {
        return None;
    };
    let (SEQUENCE, to_be_signed) = elements(certificate).next()? else {
        return None;
    };
    let (_, extensions) = elements(to_be_signed).find(|(tag, _)| *tag == EXTENSIONS)?;
    let (SEQUENCE, extensions) = elements(extensions).next()? else {
        return None;
    };
    let usage = elements(extensions).find_map(|(tag, extension)| {
        let mut fields = elements(extension);
        match (tag, fields.next()?) {
            (SEQUENCE, (OBJECT_ID, EXTENDED_KEY_USAGE)) => {
                // (After an optional `critical` flag.)
                fields.find(|(tag, _)| *tag == OCTET_STRING)
            }
            _ => None,
        }
    })?;
    let (SEQUENCE, purposes, _) = element(usage.1)? else {
        return None;
    };
    Some(
        elements(purposes)
            .filter(|(tag, _)| *tag == OBJECT_ID)
            .map(|(_, id)| id)
            .collect(),
    )
}

/// A purpose by its name where it has a common one (`serverAuth`), else
/// in dotted form.
pub fn purpose_name(id: &[u8]) -> String {
    const KEY_PURPOSES: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3];
    if let Some([number]) = id.strip_prefix(KEY_PURPOSES) {
        let name = match number {
            1 => Some("serverAuth"),
            2 => Some("clientAuth"),
            3 => Some("codeSigning"),
            4 => Some("emailProtection"),
            8 => Some("timeStamping"),
            9 => Some("OCSPSigning"),
            _ => None,
        };
        if let Some(name) = name {
            return name.to_owned();
        }
    }
    if id == [0x55, 0x1d, 0x25, 0] {
        return "anyExtendedKeyUsage".to_owned();
    }
    // Base-128 numbers, the high bit saying more follow; the first holds
    // the first two arcs (40 x first + second).
    let mut arcs: Vec<u64> = Vec::new();
    let mut number = 0u64;
    for &byte in id {
        number = (number << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (number / 40).min(2);
                arcs.extend([first, number - 40 * first]);
            } else {
                arcs.push(number);
            }
            number = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps `contents` as one DER element of `tag` (lengths up to 64 KiB).
    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match contents.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(contents);
        out
    }

    /// A certificate's layout around `extensions` (None: without them),
    /// the other fields stand-ins of their tags.
    fn certificate(extensions: Option<Vec<Vec<u8>>>) -> Vec<u8> {
        let mut to_be_signed = der(0xa0, &der(0x02, &[2]));
        to_be_signed.extend(der(0x02, &[1; 20]));
        to_be_signed.extend(der(SEQUENCE, &der(OBJECT_ID, &[0x2a, 0x86, 0x48])));
        // Issuer, validity, subject, a key: long enough for the long
        // length form.
        for _ in 0..3 {
            to_be_signed.extend(der(SEQUENCE, &[0x31; 150]));
        }
        to_be_signed.extend(der(SEQUENCE, &[0; 300]));
        if let Some(extensions) = extensions {
            to_be_signed.extend(der(EXTENSIONS, &der(SEQUENCE, &extensions.concat())));
        }
        let mut certificate = der(SEQUENCE, &to_be_signed);
        certificate.extend(der(SEQUENCE, &der(OBJECT_ID, &[0x2a, 0x86, 0x48])));
        certificate.extend(der(0x03, &[0; 70]));
        der(SEQUENCE, &certificate)
    }

    fn extension(id: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
        let mut fields = der(OBJECT_ID, id);
        if critical {
            fields.extend(der(0x01, &[0xff]));
        }
        fields.extend(der(OCTET_STRING, value));
        der(SEQUENCE, &fields)
    }

    fn usage(purposes: &[&[u8]]) -> Vec<u8> {
        let ids: Vec<u8> = purposes.iter().flat_map(|id| der(OBJECT_ID, id)).collect();
        der(SEQUENCE, &ids)
    }

    #[test]
    fn the_listed_purposes_are_read_after_other_extensions() {
        let basic_constraints = extension(&[0x55, 0x1d, 0x13], true, &der(SEQUENCE, &[]));
        for critical in [false, true] {
            let listed = usage(&[CLIENT_AUTH, &[0x2b, 6, 1, 5, 5, 7, 3, 4]]);
            let cert = certificate(Some(vec![
                basic_constraints.clone(),
                extension(EXTENDED_KEY_USAGE, critical, &listed),
            ]));
            let purposes = extended_key_usages(&cert).unwrap();
            let names: Vec<String> = purposes.iter().map(|id| purpose_name(id)).collect();
            assert_eq!(
                names,
                ["clientAuth", "emailProtection"],
                "critical {critical}"
            );
        }
    }

    #[test]
    fn without_the_extension_any_purpose_goes() {
        let basic_constraints = extension(&[0x55, 0x1d, 0x13], false, &der(SEQUENCE, &[]));
        assert_eq!(
            extended_key_usages(&certificate(Some(vec![basic_constraints]))),
            None
        );
        assert_eq!(extended_key_usages(&certificate(None)), None);
    }

    #[test]
    fn what_is_not_laid_out_as_a_certificate_is_left_alone() {
        let cert = certificate(Some(vec![extension(
            EXTENDED_KEY_USAGE,
            false,
            &usage(&[SERVER_AUTH]),
        )]));
        assert_eq!(extended_key_usages(&cert).unwrap(), [SERVER_AUTH]);
        // Cut anywhere, or not DER at all: no purposes read, no panic.
        for end in 0..cert.len() {
            assert_eq!(extended_key_usages(&cert[..end]), None, "cut at {end}");
        }
        assert_eq!(extended_key_usages(b"-----BEGIN CERTIFICATE-----"), None);
        assert_eq!(
            extended_key_usages(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    /// Broken inside, within a well-formed outside: the extension's value
    /// cut short, or a length there that runs past its element. Never a
    /// panic; never a purpose that is not wholly there.
    #[test]
    fn a_broken_extension_inside_a_whole_certificate_reads_as_what_is_whole() {
        let listed = usage(&[CLIENT_AUTH, SERVER_AUTH]);
        for end in 0..listed.len() {
            let cert = certificate(Some(vec![extension(
                EXTENDED_KEY_USAGE,
                false,
                &listed[..end],
            )]));
            assert_eq!(extended_key_usages(&cert), None, "the list cut at {end}");
        }
        // The list whole, its second purpose's length (after the list's
        // header, the first purpose and the second's tag) past its end.
        let mut overlong = listed.clone();
        overlong[2 + 2 + CLIENT_AUTH.len() + 1] = 0x7f;
        let cert = certificate(Some(vec![extension(EXTENDED_KEY_USAGE, false, &overlong)]));
        assert_eq!(extended_key_usages(&cert).unwrap(), [CLIENT_AUTH]);
        // The extension's own value cut inside the list it wraps.
        let mut value = der(OCTET_STRING, &listed);
        value.truncate(value.len() - 3);
        let mut fields = der(OBJECT_ID, EXTENDED_KEY_USAGE);
        fields.extend(value);
        let cert = certificate(Some(vec![der(SEQUENCE, &fields)]));
        assert_eq!(extended_key_usages(&cert), None);
    }

    /// A certificate OpenSSL made (`req -x509`, P-256, valid to 2126, made
    /// for this test alone: it guards nothing) with a critical
    /// extendedKeyUsage of serverAuth and Microsoft's EFS, after a
    /// subject and an authority key id, before subjectAltName.
    const OPENSSL_CERT: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBtzCCAV2gAwIBAgIUf+Z99gewMdPPU93hJ+y45+BVjiMwCgYIKoZIzj0EAwIw\n\
FTETMBEGA1UEAwwKZmxnZm4tdGVzdDAgFw0yNjEyMDcxNzUzMzZaGA8yMTI2MTEx\n\
MzE3NTMzNlowFTETMBEGA1UEAwwKZmxnZm4tdGVzdDBZMBMGByqGSM49AgEGCCqG\n\
SM49AwEHA0IABNbpuk918P3HRIxNyxrsFmD6XLv1iUMoEAr7nb9+Ad1uNP3gFKJ7\n\
UiUN0G3kmi90tQ8mRdbz5XTtLIzIZYPRacmjgYgwgYUwHQYDVR0OBBYEFC+4QQhG\n\
gWT2lBecHwrHRoPQ2K2rMB8GA1UdIwQYMBaAFC+4QQhGgWT2lBecHwrHRoPQ2K2r\n\
MCIGA1UdJQEB/wQYMBYGCCsGAQUFBwMBBgorBgEEAYI3CgMEMBQGA1UdEQQNMAuC\n\
CWxvY2FsaG9zdDAJBgNVHRMEAjAAMAoGCCqGSM49BAMCA0gAMEUCIQCLaDMyv3Hy\n\
uxBC4GzXhF+5r+3r921Y0lZpkN/urW0nLQIgVCUz62qrnH7ydQACpX1nW6A2Zp+C\n\
WRupbieoYXz8cLY=\n\
-----END CERTIFICATE-----\n";

    #[test]
    fn an_openssl_certificate_lists_its_purposes() {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let cert = CertificateDer::from_pem_slice(OPENSSL_CERT.as_bytes()).unwrap();
        let names: Vec<String> = extended_key_usages(&cert)
            .unwrap()
            .iter()
            .map(|id| purpose_name(id))
            .collect();
        assert_eq!(names, ["serverAuth", "1.3.6.1.4.1.311.10.3.4"]);
    }

    #[test]
    fn purposes_without_a_common_name_are_dotted() {
        assert_eq!(purpose_name(SERVER_AUTH), "serverAuth");
        assert_eq!(purpose_name(&[0x55, 0x1d, 0x25, 0]), "anyExtendedKeyUsage");
        // 1.3.6.1.4.1.311.10.3.4 (Microsoft's EFS), with a two-byte arc.
        let efs = [0x2b, 6, 1, 4, 1, 0x82, 0x37, 10, 3, 4];
        assert_eq!(purpose_name(&efs), "1.3.6.1.4.1.311.10.3.4");
    }
}
