//! DANE (RFC 7672) certificate selection: the part of an X.509
//! certificate a TLSA record's selector names. Pure DER walking; hashing
//! and the TLS handshake are the driver's.

/// One DER element of a longer input.
struct Element<'a> {
    tag: u8,
    /// Tag, length and contents.
    whole: &'a [u8],
    contents: &'a [u8],
    /// What follows the element.
    rest: &'a [u8],
}

fn element(input: &[u8]) -> Option<Element<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    let whole = input.get(..end)?;
    Some(Element {
        tag,
        whole,
        contents: &whole[header..],
        rest: &input[end..],
    })
}

/// The DER SubjectPublicKeyInfo of a DER certificate (selector 1).
pub fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let certificate = element(cert).filter(|e| e.tag == SEQUENCE)?;
    let tbs = element(certificate.contents).filter(|e| e.tag == SEQUENCE)?;
    let mut fields = tbs.contents;
    // [0] version (optional), serial, signature, issuer, validity, subject.
    if fields.first() == Some(&0xa0) {
        fields = element(fields)?.rest;
    }
    for _ in 0..5 {
        fields = element(fields)?.rest;
    }
    let spki = element(fields).filter(|e| e.tag == SEQUENCE)?;
    Some(spki.whole)
}

/// What a TLSA record with `selector` is compared against: the whole
/// certificate (0) or its SubjectPublicKeyInfo (1).
pub fn selected(cert: &[u8], selector: u8) -> Option<&[u8]> {
    match selector {
        0 => Some(cert),
        1 => subject_public_key_info(cert),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate shaped like a real one, with recognisable fields.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    fn certificate(with_version: bool, key: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let spki = der(
            0x30,
            &[der(0x30, &[0x06, 0x01, 0x2a]), der(0x03, key)].concat(),
        );
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(der(0xa0, &der(0x02, &[2])));
        }
        tbs.extend(der(0x02, &[1, 2, 3]));
        tbs.extend(der(0x30, &[0x06, 0x01, 0x2b]));
        tbs.extend(der(0x30, b"issuer"));
        tbs.extend(der(0x30, b"validity"));
        tbs.extend(der(0x30, b"subject"));
        tbs.extend(&spki);
        tbs.extend(der(0xa3, b"extensions"));
        let cert = der(
            0x30,
            &[der(0x30, &tbs), der(0x30, b"alg"), der(0x03, b"sig")].concat(),
        );
        (cert, spki)
    }

    #[test]
    fn finds_the_public_key_info_with_or_without_a_version() {
        for with_version in [true, false] {
            let (cert, spki) = certificate(with_version, &[0u8; 200]);
            assert_eq!(subject_public_key_info(&cert), Some(&spki[..]));
            assert_eq!(selected(&cert, 1), Some(&spki[..]));
            assert_eq!(selected(&cert, 0), Some(&cert[..]));
            assert_eq!(selected(&cert, 2), None);
        }
    }

    #[test]
    fn truncated_or_odd_input_is_none_not_a_panic() {
        let (cert, _) = certificate(true, &[1u8; 300]);
        for cut in 0..cert.len() {
            let _ = subject_public_key_info(&cert[..cut]);
        }
        assert_eq!(subject_public_key_info(&[]), None);
        assert_eq!(subject_public_key_info(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(subject_public_key_info(&[0x31, 0x00]), None);
    }
}
