//! RFC 3602 §4 test vectors for AES-CBC.
//!
//! Cases 1–4 are raw AES-128-CBC encryptions. Cases 5–8 are complete ESP packets (SPI, sequence
//! number, IV, ciphertext) but without authentication, so they carry no ICV: here they are
//! sealed with their published IV through `seal_one`, compared byte for byte up to the ICV,
//! the ICV is checked against an HMAC-SHA1-96 computed independently over the published
//! packet, and `open` must give back the plaintext (payload + RFC 4303 trailer).

use aes::Aes128;
use aes::cipher::KeyInit;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::h;
use crate::cbc::{cbc_decrypt, cbc_encrypt, concrete, wrap};
use crate::{CipherAlg, IntegAlg, OpStatus, Transform};

struct Raw {
    case: u8,
    key: &'static str,
    iv: &'static str,
    plaintext: &'static [u8],
    ciphertext: &'static str,
}

#[test]
fn rfc3602_cases_1_to_4() {
    let cases = [
        Raw {
            case: 1,
            key: "06a9214036b8a15b512e03d534120006",
            iv: "3dafba429d9eb430b422da802c9fac41",
            plaintext: b"Single block msg",
            ciphertext: "e353779c1079aeb82708942dbe77181a",
        },
        Raw {
            case: 2,
            key: "c286696d887c9aa0611bbb3e2025a45a",
            iv: "562e17996d093d28ddb3ba695a2e6f58",
            plaintext: &[
                0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
                0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b,
                0x1c, 0x1d, 0x1e, 0x1f,
            ],
            ciphertext: "d296cd94c2cccf8a3a863028b5e1dc0a
                         7586602d253cfff91b8266bea6d61ab1",
        },
        Raw {
            case: 3,
            key: "6c3ea0477630ce21a2ce334aa746c2cd",
            iv: "c782dc4c098c66cbd9cd27d825682c81",
            plaintext: b"This is a 48-byte message (exactly 3 AES blocks)",
            ciphertext: "d0a02b3836451753d493665d33f0e886
                         2dea54cdb293abc7506939276772f8d5
                         021c19216bad525c8579695d83ba2684",
        },
        Raw {
            case: 4,
            key: "56e47a38c5598974bc46903dba290349",
            iv: "8ce82eefbea0da3c44699ed7db51b7d9",
            plaintext: &[
                0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad,
                0xae, 0xaf, 0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb,
                0xbc, 0xbd, 0xbe, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9,
                0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7,
                0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf,
            ],
            ciphertext: "c30e32ffedc0774e6aff6af0869f71aa
                         0f3af07a9a31a9c684db207eb0ef8e4e
                         35907aa632c3ffdf868bb7b29d3d46ad
                         83ce9f9a102ee99d49a53e87f4c3da55",
        },
    ];
    for c in cases {
        let aes = Aes128::new_from_slice(&h(c.key)).unwrap();
        let iv = h(c.iv);
        let mut buf = c.plaintext.to_vec();
        assert!(cbc_encrypt(&aes, &iv, &mut buf), "case {}", c.case);
        assert_eq!(buf, h(c.ciphertext), "case {}", c.case);
        assert!(cbc_decrypt(&aes, &iv, &mut buf), "case {}", c.case);
        assert_eq!(buf, c.plaintext, "case {}", c.case);
    }
}

#[test]
fn cbc_rejects_partial_blocks_and_bad_iv() {
    let aes = Aes128::new_from_slice(&[0; 16]).unwrap();
    let mut buf = [0u8; 17];
    assert!(!cbc_encrypt(&aes, &[0; 16], &mut buf));
    assert!(!cbc_decrypt(&aes, &[0; 16], &mut buf));
    let mut buf = [0u8; 16];
    assert!(!cbc_encrypt(&aes, &[0; 8], &mut buf));
    assert_eq!(buf, [0; 16]);
}

struct EspCase {
    case: u8,
    key: &'static str,
    seq: u32,
    /// Payload before padding (the original packet's data, or the whole inner packet in tunnel mode).
    payload: &'static str,
    /// Padding, pad length, next header.
    trailer: &'static str,
    /// SPI, sequence number, IV, ciphertext.
    packet: &'static str,
}

const ESP_CASES: &[EspCase] = &[
    // Case #5: sample transport-mode ESP packet (ping 192.168.123.100).
    EspCase {
        case: 5,
        key: "90d382b4 10eeba7a d938c46c ec1a82bf",
        seq: 1,
        payload: "08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
                  18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637",
        trailer: "01020304 05060708 090a0b0c 0d0e 0e 01",
        packet: "00004321 00000001
                 e96e8c08 ab465763 fd098d45 dd3ff893
                 f663c25d 325c18c6 a9453e19 4e120849 a4870b66 cc6b9965 330013b4 898dc856
                 a4699e52 3a55db08 0b59ec3a 8e4b7e52 775b07d1 db34ed9c 538ab50c 551b874a
                 a269add0 47ad2d59 13ac19b7 cfbad4a6",
    },
    // Case #6: sample transport-mode ESP packet (ping -p 77 -s 20 192.168.123.100).
    EspCase {
        case: 6,
        key: "90d382b4 10eeba7a d938c46c ec1a82bf",
        seq: 8,
        payload: "0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777",
        trailer: "0102 02 01",
        packet: "00004321 00000008
                 69d08df7 d203329d b093fc49 24e5bd80
                 f5199588 1ec4e0c4 488987ce 742e8109 689bb379 d2d750c0 d915dca3 46a89f75",
    },
    // Case #7: sample tunnel-mode ESP packet (ping 192.168.123.200).
    EspCase {
        case: 7,
        key: "01234567 89abcdef 01234567 89abcdef",
        seq: 2,
        payload: "45000054 09040000 4001f988 c0a87b03 c0a87bc8 08009f76 a90a0100 b49c083d
                  02a20400 08090a0b 0c0d0e0f 10111213 14151617 18191a1b 1c1d1e1f 20212223
                  24252627 28292a2b 2c2d2e2f 30313233 34353637",
        trailer: "01020304 05060708 090a 0a 04",
        packet: "00008765 00000002
                 f4e76524 4f6407ad f13dc138 0f673f37
                 773b5241 a4c44922 5e4f3ce5 ed611b0c 237ca96c f74a9301 3c1b0ea1 a0cf70f8
                 e4ecaec7 8ac53aad 7a0f022b 859243c6 47752e94 a859352b 8a4d4d2d ecd136e5
                 c177f132 ad3fbfb2 201ac990 4c74ee0a 109e0ca1 e4dfe9d5 a100b842 f1c22f0d",
    },
    // Case #8: sample tunnel-mode ESP packet (ping -p ff -s 40 192.168.123.200).
    EspCase {
        case: 8,
        key: "01234567 89abcdef 01234567 89abcdef",
        seq: 5,
        payload: "45000044 090c0000 4001f990 c0a87b03 c0a87bc8 0800d63c aa0a0200 c69c083d
                  a3de0300 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff
                  ffffffff",
        trailer: "01020304 05060708 090a 0a 04",
        packet: "00008765 00000005
                 85d47224 b5f3dd5d 2101d4ea 8dffab22
                 15b92683 819596a8 047232cc 00f7048f e45318e1 1f8a0f62 ede3c3fc 61203bb5
                 0f980a08 c9843fd3 a1b06d5c 07ff9639 b7eb7dfb 3512e5de 435e7207 ed971ef3
                 d2726d9b 5ef6affc 6d17a0de cbb13892",
    },
];

#[test]
fn rfc3602_esp_cases_5_to_8() {
    let t = Transform::CipherAuth {
        cipher: CipherAlg::Aes128Cbc,
        integ: IntegAlg::HmacSha1_96,
    };
    let integ_key = [0x0bu8; 20];
    for c in ESP_CASES {
        let packet = h(c.packet);
        let mut body = h(c.payload);
        body.extend_from_slice(&h(c.trailer));
        assert_eq!(packet.len(), 8 + 16 + body.len(), "case {}", c.case);
        assert_eq!(&packet[4..8], &c.seq.to_be_bytes(), "case {}", c.case);

        let aes = Aes128::new_from_slice(&h(c.key)).unwrap();
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(&integ_key).unwrap();
        let sa = concrete(t, wrap(aes), mac, false);

        // Seal with the published IV.
        let mut p = packet[..8].to_vec();
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&body);
        p.resize(p.len() + 12, 0);
        let iv = &packet[8..24];
        let status = sa.seal_one(&mut p, u64::from(c.seq), |out| out.copy_from_slice(iv));
        assert_eq!(status, OpStatus::Ok, "case {}", c.case);
        assert_eq!(&p[..packet.len()], &packet[..], "case {}", c.case);

        // ICV = HMAC-SHA1(SPI || seq || IV || ciphertext), first 12 bytes.
        let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(&integ_key).unwrap();
        m.update(&packet);
        let full = m.finalize().into_bytes();
        assert_eq!(&p[packet.len()..], &full[..12], "case {}", c.case);

        // Open gives back payload + trailer.
        assert_eq!(
            sa.open_one(&mut p, u64::from(c.seq)),
            OpStatus::Ok,
            "case {}",
            c.case
        );
        assert_eq!(&p[24..p.len() - 12], &body[..], "case {}", c.case);
    }
}
