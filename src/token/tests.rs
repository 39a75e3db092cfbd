//! Round trips, and every way a token can be cut, damaged or forged:
//! each is refused with its own error, never misread and never a panic.

use super::*;

fn sample(hint: Option<&str>) -> Token {
    Token {
        server_public_key: PrivateKey::generate().public_key(),
        invite_key: PrivateKey::generate(),
        port: 51820,
        subnet: "10.77.0.0/24".parse().unwrap(),
        subnet6: None,
        assigned: "10.77.0.2".parse().unwrap(),
        server_address: "10.77.0.1".parse().unwrap(),
        expires: 2_000_000_000,
        endpoint_hint: hint.map(str::to_owned),
        udp: true,
        websocket: None,
    }
}

#[test]
fn round_trip_with_and_without_hint() {
    for hint in [None, Some("vpn.example.org:51820")] {
        let t = sample(hint);
        let s = t.encode();
        assert!(s.starts_with("tun1_"));
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        );
        assert_eq!(Token::decode(&s).unwrap(), t);
    }
}

#[test]
fn a_dual_stack_token_carries_both_families() {
    let t = Token {
        subnet6: Some("fd12:3456:789a::/64".parse().unwrap()),
        ..sample(Some("[2001:db8::1]:51820"))
    };
    let back = Token::decode(&t.encode()).unwrap();
    assert_eq!(back, t);
    assert_eq!(
        back.subnets().interface(back.assigned)[1].to_string(),
        "fd12:3456:789a::2/64"
    );
    // An IPv4 "IPv6 subnet" is refused like any inconsistency.
    let mut bad = sample(None);
    bad.subnet6 = Some("fd00::/124".parse().unwrap());
    let e = Token::decode(&bad.encode()).unwrap_err();
    assert!(matches!(e, TokenError::Invalid(_)), "{e}");
}

#[test]
fn round_trip_with_websocket_offers() {
    for target in [
        WsTarget::Pinned {
            port: 443,
            sha256: [9; 32],
        },
        WsTarget::Plain { port: 8080 },
        WsTarget::Url {
            base: "wss://vpn.example.org".into(),
        },
    ] {
        for udp in [true, false] {
            let mut t = sample(Some("h:1"));
            t.udp = udp;
            t.websocket = Some(WsOffer {
                target: target.clone(),
                path: "/t/abcdefghijklmnopqrstuv".into(),
            });
            let s = t.encode();
            assert_eq!(Token::decode(&s).unwrap(), t);
            // Every cut is a truncation, never a panic or a misread.
            for cut in 1..s.len() - "tun1_".len() {
                assert!(
                    matches!(
                        Token::decode(&s[..s.len() - cut]),
                        Err(TokenError::Truncated { .. })
                    ),
                    "cut {cut}"
                );
            }
        }
    }
    let mut none = sample(None);
    none.udp = false;
    assert!(matches!(
        Token::decode(&none.encode()),
        Err(TokenError::Invalid(_))
    ));
}

#[test]
fn round_trip_ipv6() {
    let mut t = sample(None);
    t.subnet = "fd00:77::/64".parse().unwrap();
    t.assigned = "fd00:77::2".parse().unwrap();
    t.server_address = "fd00:77::1".parse().unwrap();
    assert_eq!(Token::decode(&t.encode()).unwrap(), t);
}

#[test]
fn compact() {
    assert!(
        sample(None).encode().len() < 150,
        "{}",
        sample(None).encode().len()
    );
}

#[test]
fn debug_redacts_invite_key() {
    let t = sample(None);
    assert!(!format!("{t:?}").contains(t.invite_key.to_base64().as_str()));
}

#[test]
fn truncated() {
    let s = sample(Some("host:1")).encode();
    for cut in 1..s.len() - "tun1_".len() {
        let err = Token::decode(&s[..s.len() - cut]).unwrap_err();
        assert!(
            matches!(err, TokenError::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
    }
    assert!(matches!(
        Token::decode("tun1_"),
        Err(TokenError::Truncated { .. })
    ));
    assert!(matches!(
        Token::decode(&s[..40]),
        Err(TokenError::Truncated { .. })
    ));
}

#[test]
fn every_flipped_character_is_caught() {
    let s = sample(None).encode();
    let body_start = "tun1_".len();
    for i in body_start..s.len() {
        let mut b = s.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(b).unwrap();
        if flipped == s {
            continue;
        }
        let err = Token::decode(&flipped).unwrap_err();
        assert!(
            matches!(err, TokenError::Corrupted(_) | TokenError::Truncated { .. }),
            "position {i}: {err:?}"
        );
    }
}

#[test]
fn wrong_prefix_and_version() {
    let s = sample(None).encode();
    assert_eq!(
        Token::decode(&s.replacen("tun", "wg", 1)),
        Err(TokenError::NotAToken)
    );
    assert_eq!(Token::decode("hello"), Err(TokenError::NotAToken));
    assert_eq!(Token::decode(""), Err(TokenError::NotAToken));
    assert_eq!(
        Token::decode(&s.replacen("tun1_", "tun2_", 1)),
        Err(TokenError::UnsupportedVersion(2))
    );
    assert_eq!(
        Token::decode(&s.replacen("tun1_", "tunx_", 1)),
        Err(TokenError::NotAToken)
    );
}

#[test]
fn whitespace_around_is_ignored() {
    let t = sample(None);
    assert_eq!(Token::decode(&format!("  {}\n", t.encode())).unwrap(), t);
}

#[test]
fn expiry() {
    let t = sample(None);
    let before = UNIX_EPOCH + Duration::from_secs(1_999_999_999);
    let after = UNIX_EPOCH + Duration::from_secs(2_000_003_600);
    assert!(t.check_expiry(before).is_ok());
    let err = t.check_expiry(after).unwrap_err();
    assert!(
        matches!(&err, TokenError::Expired { ago, .. } if ago == "1h"),
        "{err:?}"
    );
    assert!(err.to_string().contains("2033-05-18T03:33:20Z"), "{err}");
}

#[test]
fn a_forged_far_future_expiry_is_invalid_not_a_panic() {
    let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    for expires in [u64::MAX, u64::MAX / 2, 2_000_000_000 + 400 * 24 * 3600] {
        let mut t = sample(None);
        t.expires = expires;
        let t = Token::decode(&t.encode()).unwrap();
        assert!(
            matches!(t.check_expiry(now), Err(TokenError::Invalid(_))),
            "{expires}"
        );
    }
}

#[test]
fn semantic_checks() {
    let mut t = sample(None);
    t.assigned = "10.78.0.2".parse().unwrap();
    assert!(matches!(
        Token::decode(&t.encode()),
        Err(TokenError::Invalid(_))
    ));
}

/// The binary form of `t` without its CRC, to be changed and sealed.
fn payload(t: &Token) -> Vec<u8> {
    let text = t.encode();
    let mut raw = URL_SAFE_NO_PAD.decode(&text["tun1_".len()..]).unwrap();
    raw.truncate(raw.len() - 4);
    raw
}

/// A token of `payload` with a CRC that matches: what a forger or a
/// buggy server could produce.
fn seal(mut payload: Vec<u8>) -> String {
    let crc = crc32fast::hash(&payload);
    payload.extend_from_slice(&crc.to_be_bytes());
    format!("tun1_{}", URL_SAFE_NO_PAD.encode(&payload))
}

/// Where the fixed IPv4 layout puts things.
const PORT: usize = 1 + 32 + 32;
const PREFIX_AT: usize = PORT + 2;
const SUBNET: usize = PREFIX_AT + 1;
const SERVER: usize = SUBNET + 8;
const END: usize = SERVER + 4 + 8;

fn invalid(text: &str) -> String {
    match Token::decode(text) {
        Err(TokenError::Invalid(why)) => why,
        other => panic!("not refused as invalid: {other:?}"),
    }
}

#[test]
fn sealing_a_payload_unchanged_gives_the_same_token() {
    // The helpers below are only as good as this.
    let t = sample(Some("h:1"));
    assert_eq!(seal(payload(&t)), t.encode());
    assert_eq!(payload(&sample(None)).len(), END);
}

#[test]
fn unknown_flags_are_invalid_even_with_a_good_checksum() {
    let mut p = payload(&sample(None));
    p[0] |= 0x80;
    assert!(invalid(&seal(p)).contains("unknown flags 0x80"));
}

#[test]
fn an_unknown_websocket_kind_is_invalid_not_misread() {
    let mut p = payload(&sample(None));
    p[0] |= FLAG_WS;
    p.extend_from_slice(&[9, 0, 0, 0, 0, 0]);
    assert!(invalid(&seal(p)).contains("unknown WebSocket kind 9"));
}

#[test]
fn bytes_beyond_the_contents_are_corruption() {
    let mut p = payload(&sample(None));
    let crc = crc32fast::hash(&p);
    p.extend_from_slice(&crc.to_be_bytes());
    p.push(0);
    let text = format!("tun1_{}", URL_SAFE_NO_PAD.encode(&p));
    assert_eq!(
        Token::decode(&text),
        Err(TokenError::Corrupted("it is longer than its contents say"))
    );
}

#[test]
fn characters_outside_base64url_are_named_as_such() {
    let text = sample(None).encode();
    for bad in ['+', '/', '=', '!', ' '] {
        let mut t = text.clone();
        t.insert(20, bad);
        assert_eq!(
            Token::decode(&t),
            Err(TokenError::Corrupted(
                "it holds characters that are not base64url"
            )),
            "{bad:?}"
        );
    }
}

#[test]
fn a_version_too_large_for_a_number_is_unsupported_not_a_panic() {
    let text = sample(None)
        .encode()
        .replacen("tun1_", "tun99999999999_", 1);
    assert_eq!(
        Token::decode(&text),
        Err(TokenError::UnsupportedVersion(u32::MAX))
    );
}

#[test]
fn a_subnet_must_be_a_network_with_a_prefix_in_range() {
    let mut p = payload(&sample(None));
    p[PREFIX_AT] = 33;
    assert!(invalid(&seal(p)).contains("prefix /33 is out of range"));
    let mut p = payload(&sample(None));
    p[SUBNET + 3] = 1;
    assert!(invalid(&seal(p)).contains("10.77.0.1/24 is not a network address"));
}

#[test]
fn the_servers_address_must_be_inside_the_subnet_and_not_the_joiners() {
    let mut t = sample(None);
    t.server_address = "10.78.0.1".parse().unwrap();
    assert!(invalid(&t.encode()).contains("server address 10.78.0.1 is outside"));
    let mut t = sample(None);
    t.assigned = t.server_address;
    assert!(invalid(&t.encode()).contains("equals the server's"));
}

#[test]
fn port_zero_is_invalid_for_udp_and_for_a_websocket() {
    let mut t = sample(None);
    t.port = 0;
    assert_eq!(invalid(&t.encode()), "port 0");
    for target in [
        WsTarget::Plain { port: 0 },
        WsTarget::Pinned {
            port: 0,
            sha256: [1; 32],
        },
    ] {
        let mut t = sample(None);
        t.websocket = Some(WsOffer {
            target,
            path: "/t/x".into(),
        });
        assert_eq!(invalid(&t.encode()), "WebSocket port 0");
    }
}

#[test]
fn a_websocket_path_must_be_absolute_and_free_of_blanks_and_controls() {
    for path in ["t/x", "", "/t x", "/t\tx", "/t\u{7f}"] {
        let mut t = sample(None);
        t.websocket = Some(WsOffer {
            target: WsTarget::Plain { port: 80 },
            path: path.into(),
        });
        assert!(
            invalid(&t.encode()).starts_with("WebSocket path"),
            "{path:?}"
        );
    }
}

#[test]
fn text_fields_that_are_not_utf8_are_invalid() {
    let mut p = payload(&sample(Some("ab")));
    p[END + 1] = 0xff;
    assert_eq!(invalid(&seal(p)), "endpoint hint is not UTF-8");
}

#[test]
fn a_long_hint_is_cut_to_what_a_length_byte_holds() {
    let hint = "h".repeat(300);
    let t = sample(Some(&hint));
    let back = Token::decode(&t.encode()).unwrap();
    assert_eq!(back.endpoint_hint.unwrap().len(), 255);
}

#[test]
fn the_assigned_network_carries_the_subnets_prefix() {
    let t = sample(None);
    assert_eq!(t.assigned_network().to_string(), "10.77.0.2/24");
    assert_eq!(t.subnets().main, t.subnet);
    assert_eq!(
        t.expires_at(),
        Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
    );
}
