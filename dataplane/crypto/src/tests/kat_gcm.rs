//! AES-GCM-ESP test cases of draft-mcgrew-gcm-test-01 ("Test Cases for the use of GCM and GMAC
//! in IPsec ESP", March 2009), section 4, typed in from the draft.
//!
//! The draft's `key` excludes the salt; the salt is the first 4 bytes of its `nonce`, and the
//! ESP IV the last 8. A 4-octet `seq` is a plain sequence number, an 8-octet one an extended
//! sequence number (12-byte AAD, RFC 4106 §5). None of the vectors uses IV = sequence number,
//! so `open` is tested on the published packet and `seal` through `seal_one_with_iv`.
//!
//! Left out: the AES-192 case (page 11, 24-octet key; not a transform we offer) and the
//! AES-GMAC-ESP case (page 18; ENCR_NULL_AUTH_AES_GMAC is not a transform we offer).

use super::h;
use crate::gcm::GcmSa;
use crate::{AeadAlg, OpStatus};

struct Vector {
    page: &'static str,
    key: &'static str,
    seq: u64,
    esn: bool,
    nonce: &'static str,
    plaintext: &'static str,
    aad: &'static str,
    packet: &'static str,
}

const VECTORS: &[Vector] = &[
    Vector {
        page: "6",
        key: "4c80cdefbb5d10da906ac73c3613a634",
        seq: 0x8765432100000000,
        esn: true,
        nonce: "2e443b684956ed7e3b244cfe",
        plaintext: "45000048699a000080114db7c0a80102
                    c0a801010a9bf15638d3010000010000
                    00000000045f736970045f7564700373
                    69700963796265726369747902646b00
                    0021000101020201",
        aad: "000043218765432100000000",
        packet: "00004321000000004956ed7e3b244cfe
                 fecf537e729d5b07dc30df528dd22b76
                 8d1b98736696a6fd348509fa13ceac34
                 cfa2436f14a3f3cf65925bf1f4a13c5d
                 15b21e1884f5ff6247aeabb786b93bce
                 61bc17d768fd9732459018148f6cbe72
                 2fd04796562dfdb4",
    },
    Vector {
        page: "7",
        key: "feffe9928665731c6d6a8f9467308308",
        seq: 0x0000000a,
        esn: false,
        nonce: "cafebabefacedbaddecaf888",
        plaintext: "4500003e698f000080114dccc0a80102
                    c0a801010a980035002a2343b2d00100
                    00010000000000000373697009637962
                    65726369747902646b00000100010001",
        aad: "0000a5f80000000a",
        packet: "0000a5f80000000afacedbaddecaf888
                 deb22cd9b07c72c16e3a65beeb8df304
                 a5a5897d33ae530f1ba76d5d114d2a5c
                 3de81827c10e9a4f51330d0eec416642
                 cfbb85a5b47e48a4ec3b9ba95d918bd1
                 83b70d3aa8bc6ee4c309e9d85a41ad4a",
    },
    Vector {
        page: "8",
        key: "abbccddef00112233445566778899aab
              abbccddef00112233445566778899aab",
        seq: 0x00000002,
        esn: false,
        nonce: "112233440102030405060708",
        plaintext: "4500003069a6400080062690c0a80102
                    9389155e0a9e008b2dc57ee000000000
                    7002400020bf0000020405b401010402
                    01020201",
        aad: "4a2cbfe300000002",
        packet: "4a2cbfe3000000020102030405060708
                 ff425c9b724599df7a3bcd510194e00d
                 6a78107f1b0b1cbf06efae9d65a5d763
                 748a637985771d347f0545659f14e99d
                 ef842d8eb335f4eecfdbf831824b4c49
                 15956c96",
    },
    Vector {
        page: "9",
        key: "00000000000000000000000000000000",
        seq: 0x00000001,
        esn: false,
        nonce: "000000000000000000000000",
        plaintext: "4500003c99c500008001cb7a40679318
                    010101010800075c0200440061626364
                    65666768696a6b6c6d6e6f7071727374
                    75767761626364656667686901020201",
        aad: "0000000000000001",
        packet: "00000000000000010000000000000000
                 4688daf2f973a392732909c331d56d60
                 f694abaa414b5e7ff5fdcdfff5e9a284
                 456476492719ffb64de7d9dca1e1d894
                 bc3bd57873ed4d181d19d4d5c8c18af3
                 f821d496eeb096e98ad2b69e4799c71d",
    },
    Vector {
        page: "10",
        key: "3de09874b388e6491988d0c3607eae1f",
        seq: 0x1010101010101010,
        esn: true,
        nonce: "57690e434e280000a2fca1a3",
        plaintext: "4500003c99c300008001cb7c40679318
                    010101010800085c0200430061626364
                    65666768696a6b6c6d6e6f7071727374
                    75767761626364656667686901020201",
        aad: "42f67e3f1010101010101010",
        packet: "42f67e3f101010104e280000a2fca1a3
                 fba2caa4853cf9f0f22cb10d86dd83b0
                 fec75691cf1a04b00d1138ec9c357917
                 65acbd8701ad79845bf9fe3fba487bc9
                 1755e6662b4c8d0d1f5e22739530320a
                 e0d731cc978ecafaeae88f00e80d6e48",
    },
    Vector {
        page: "11 (first)",
        key: "3de09874b388e6491988d0c3607eae1f",
        seq: 0x1010101010101010,
        esn: true,
        nonce: "57690e434e280000a2fca1a3",
        plaintext: "4500001c42a200008001441f406793b6
                    e00000020a00f5ff01020201",
        aad: "42f67e3f1010101010101010",
        packet: "42f67e3f101010104e280000a2fca1a3
                 fba2ca845e5df9f0f22c3e6e86dd831e
                 1fc65792cd1af9130e1379ed369f071f
                 35e034be95f112e4e7d05d35",
    },
    Vector {
        page: "12",
        key: "abbccddef00112233445566778899aab",
        seq: 0x0000000000000001,
        esn: true,
        nonce: "decaf888cafedebaceface74",
        plaintext: "4500004933ba00007f119106c3fb1d10
                    c2b1d326c02831ce0035dd7b800302d5
                    00004e20001e8c18d75b81dc91baa047
                    6b91b924b280389d92c963bac046ec95
                    9b6266c04722b14923010101",
        aad: "000001000000000000000001",
        packet: "0000010000000001cafedebaceface74
                 18a6fd42f72cbf4ab2a2ea901f73d814
                 e3e7f243d95412e1c349c1d2fbec168f
                 9190feebaf2cb01984e65863965d7472
                 b79da345e0e780191f0d2f0e0f496c22
                 6f2127b27db35724e7845d68651f57e6
                 5f354f75ff17015769623436",
    },
    Vector {
        page: "13",
        key: "abbccddef00112233445566778899aab
              abbccddef00112233445566778899aab",
        seq: 0x156f3126dd0db99b,
        esn: true,
        nonce: "73616c74616e640169766563",
        plaintext: "45080028732c00004006e9f90a010612
                    0a01038f06b88023dd6bafbecb712602
                    50101f646d540001",
        aad: "17405e67156f3126dd0db99b",
        packet: "17405e67dd0db99b616e640169766563
                 f2d69ecdbd5a0d5b8d5ef38bad4da58d
                 1f278fde98ef67549d524a3018d9a57f
                 f4d3a31ce673119e451626c2415771e3
                 b7eebca614c89b35",
    },
    Vector {
        page: "14",
        key: "3de09874b388e6491988d0c3607eae1f",
        seq: 0x1010101010101010,
        esn: true,
        nonce: "57690e434e280000a2fca1a3",
        plaintext: "45000049333e00007f119182c3fb1d10
                    c2b1d326c02831ce0035cb458003025b
                    000001e0001e8c18d65759d52284a035
                    2c71475c8880391c764d6e5ee0496b32
                    5ae270c03899493915010101",
        aad: "42f67e3f1010101010101010",
        packet: "42f67e3f101010104e280000a2fca1a3
                 fba2cad12fc1f9f00d3cebf305410db8
                 3d7784b607323d220f24b0a97d541828
                 00cadb0f68d99ef0e0c0c89ae9bea888
                 4e52d65bc1afd0740f742444747b5b39
                 ab533163aad4550ee5160975cdb608c5
                 769189609763b8e18caa81e2",
    },
    Vector {
        page: "15",
        key: "abbccddef00112233445566778899aab
              abbccddef00112233445566778899aab",
        seq: 0x156f3126dd0db99b,
        esn: true,
        nonce: "73616c74616e640169766563",
        plaintext: "636973636f0172756c65730174686501
                    6e6574776501646566696e6501746865
                    746563686e6f6c6f6769657301746861
                    7477696c6c01646566696e65746f6d6f
                    72726f7701020201",
        aad: "17405e67156f3126dd0db99b",
        packet: "17405e67dd0db99b616e640169766563
                 d4b7ed86a1777f2ea13d6973d324c69e
                 7b43f826fb56831226508bebd2dceb18
                 d0a6df10e5487df074113e14c641024e
                 3e6773d91a62ee429b043a10e3efe6b0
                 12a49363412364f8c0cac587f249e56b
                 11e24f30e44ccc76",
    },
    Vector {
        page: "16 (first)",
        key: "7d773d00c144c525ac619d18c84a3f47",
        seq: 0xffffffff,
        esn: false,
        nonce: "d966426743457e9182443bc6",
        plaintext: "01020201",
        aad: "335467aeffffffff",
        packet: "335467aeffffffff43457e9182443bc6
                 437f866bcb3f699fe9b0822bac961c45
                 04bef270",
    },
    Vector {
        page: "16 (second)",
        key: "abbccddef00112233445566778899aab",
        seq: 0x0000000000000001,
        esn: true,
        nonce: "decaf888cafedebaceface74",
        plaintext: "746f016265016f72016e6f7401746f01
                    62650001",
        aad: "000001000000000000000001",
        packet: "0000010000000001cafedebaceface74
                 29c9fc69a197d038ccdd14e2ddfcaa05
                 43332164412503524303ed3c6c5f2838
                 43af8c3e",
    },
    Vector {
        page: "17",
        key: "6c6567616c697a656d6172696a75616e
              61616e64646f69746265666f72656961",
        seq: 0xffffffffffffffff,
        esn: true,
        nonce: "7475726e333021696765746d",
        plaintext: "45000030da3a00008001df3bc0a80005
                    c0a800010800c6cd0200070061626364
                    65666768696a6b6c6d6e6f7071727374
                    01020201",
        aad: "796b6963ffffffffffffffff",
        packet: "796b6963ffffffff333021696765746d
                 f97ab2aa356d8edce17644ac8c78e25d
                 d24dedbb29ebf1b64a274b39b49c3a86
                 4cd3d78ca4ae68a32b42458fb57dbe82
                 1dcc63b9d0937ba2945f669368661a32
                 9fb4c053",
    },
    Vector {
        page: "19",
        key: "3de09874b388e6491988d0c3607eae1f",
        seq: 0x1010101010101010,
        esn: true,
        nonce: "57690e434e280000a2fca1a3",
        plaintext: "45000030da3a00008001df3bc0a80005
                    c0a800010800c6cd0200070061626364
                    65666768696a6b6c6d6e6f7071727374
                    01020201",
        aad: "3f7ef6421010101010101010",
        packet: "3f7ef642101010104e280000a2fca1a3
                 fba2caa8c6c5f9f0f22ca54a061210ad
                 3f6e5791cf1aca210d117cec9c357917
                 65acbd8701ad79845bf9fe3fba487bc9
                 6321930684eecadb56912546e7a95c97
                 40d7cb05",
    },
    Vector {
        page: "20",
        key: "4c80cdefbb5d10da906ac73c3613a634",
        seq: 0x8765432100000007,
        esn: true,
        nonce: "22433c644855ec7d3a234bfd",
        plaintext: "0800c6cd020007006162636465666768
                    696a6b6c6d6e6f707172737401020201",
        aad: "000043218765432100000007",
        packet: "00004321000000074855ec7d3a234bfd
                 74752e8aeb5d873cd7c0f4acc36c4bff
                 84b7d7b98f0ca8b6acda6894bc619069
                 ef9cbc28fe1b56a7c4e0d58c86cd2bc0",
    },
];

struct Parsed {
    page: &'static str,
    alg: AeadAlg,
    enc: Vec<u8>,
    iv: [u8; 8],
    seq: u64,
    esn: bool,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    packet: Vec<u8>,
}

fn parsed() -> Vec<Parsed> {
    VECTORS
        .iter()
        .map(|v| {
            let key = h(v.key);
            let nonce = h(v.nonce);
            assert_eq!(nonce.len(), 12, "page {}", v.page);
            let alg = match key.len() {
                16 => AeadAlg::Aes128Gcm,
                32 => AeadAlg::Aes256Gcm,
                n => panic!("page {}: key length {n}", v.page),
            };
            let mut enc = key;
            enc.extend_from_slice(&nonce[..4]);
            let packet = h(v.packet);
            let plaintext = h(v.plaintext);
            assert_eq!(
                packet.len(),
                8 + 8 + plaintext.len() + 16,
                "page {}",
                v.page
            );
            // The packet carries SPI || seq low || IV.
            assert_eq!(
                &packet[4..8],
                &(v.seq as u32).to_be_bytes(),
                "page {}",
                v.page
            );
            assert_eq!(&packet[8..16], &nonce[4..], "page {}", v.page);
            Parsed {
                page: v.page,
                alg,
                enc,
                iv: nonce[4..].try_into().unwrap(),
                seq: v.seq,
                esn: v.esn,
                plaintext,
                aad: h(v.aad),
                packet,
            }
        })
        .collect()
}

fn gcm(v: &Parsed, icv_len: u8, force_soft: bool) -> GcmSa {
    GcmSa::build(v.alg, icv_len, &v.enc, v.esn, force_soft).unwrap()
}

#[test]
fn draft_vectors_are_all_there() {
    // 17 cases in section 4, minus AES-192 and GMAC.
    assert_eq!(VECTORS.len(), 15);
    assert_eq!(parsed().iter().filter(|v| v.esn).count(), 11);
}

#[test]
fn aad_matches_draft() {
    for v in parsed() {
        let sa = gcm(&v, 16, false);
        let hdr: [u8; 8] = v.packet[..8].try_into().unwrap();
        let mut buf = [0u8; 12];
        assert_eq!(sa.aad(&hdr, v.seq, &mut buf), &v.aad[..], "page {}", v.page);
    }
}

#[test]
fn open_draft_packets() {
    for v in parsed() {
        let sa = gcm(&v, 16, false);
        let mut p = v.packet.clone();
        assert_eq!(
            sa.open_one_impl(&mut p, v.seq, false),
            OpStatus::Ok,
            "page {}",
            v.page
        );
        assert_eq!(&p[16..p.len() - 16], &v.plaintext[..], "page {}", v.page);
    }
}

#[test]
fn open_draft_packets_through_trait_batch() {
    use crate::{CryptoProvider, EspOp, SaKeys, SoftwareProvider, Transform, WorkerCtx};
    let vs = parsed();
    let mut bufs: Vec<Vec<u8>> = vs.iter().map(|v| v.packet.clone()).collect();
    let mut ctx = WorkerCtx::from_seed([1; 32]);
    for (v, buf) in vs.iter().zip(bufs.iter_mut()) {
        let t = Transform::Aead {
            alg: v.alg,
            icv_len: 16,
        };
        let sa = SoftwareProvider
            .new_sa(t, &SaKeys::new(&v.enc, &[]), v.esn)
            .unwrap();
        let mut ops = [EspOp::new(buf, v.seq)];
        sa.open(&mut ops, &mut ctx);
        assert_eq!(ops[0].status, OpStatus::Ok, "page {}", v.page);
        assert_eq!(
            &buf[16..buf.len() - 16],
            &v.plaintext[..],
            "page {}",
            v.page
        );
    }
}

#[test]
fn open_draft_packets_with_software_tag_check() {
    // The RustCrypto path (used for truncated ICVs) against the full published tags.
    for v in parsed() {
        let sa = gcm(&v, 16, true);
        let mut p = v.packet.clone();
        assert_eq!(
            sa.open_one_impl(&mut p, v.seq, true),
            OpStatus::Ok,
            "page {}",
            v.page
        );
        assert_eq!(&p[16..p.len() - 16], &v.plaintext[..], "page {}", v.page);
    }
}

#[test]
fn open_draft_packets_with_truncated_icv() {
    for v in parsed() {
        for icv in [12u8, 8] {
            let sa = gcm(&v, icv, false);
            let mut p = v.packet[..v.packet.len() - 16 + usize::from(icv)].to_vec();
            assert_eq!(
                sa.open_one_impl(&mut p, v.seq, false),
                OpStatus::Ok,
                "page {} icv {icv}",
                v.page
            );
            assert_eq!(
                &p[16..p.len() - usize::from(icv)],
                &v.plaintext[..],
                "page {}",
                v.page
            );
        }
    }
}

#[test]
fn seal_draft_packets_with_explicit_iv() {
    for v in parsed() {
        for icv in [16u8, 12, 8] {
            let sa = gcm(&v, icv, false);
            let mut p = v.packet[..8].to_vec();
            p.extend_from_slice(&[0; 8]);
            p.extend_from_slice(&v.plaintext);
            p.resize(p.len() + usize::from(icv), 0);
            assert_eq!(
                sa.seal_one_with_iv(&mut p, v.seq, v.iv),
                OpStatus::Ok,
                "page {}",
                v.page
            );
            assert_eq!(&p[..], &v.packet[..p.len()], "page {} icv {icv}", v.page);
        }
    }
}

#[test]
fn draft_packets_fail_with_wrong_esn_high_bits() {
    for v in parsed().into_iter().filter(|v| v.esn) {
        let sa = gcm(&v, 16, false);
        let mut p = v.packet.clone();
        let seq = v.seq ^ (1 << 40);
        assert_eq!(
            sa.open_one_impl(&mut p, seq, false),
            OpStatus::AuthFailed,
            "page {}",
            v.page
        );
        let sa = gcm(&v, 12, false);
        let mut p = v.packet[..v.packet.len() - 4].to_vec();
        assert_eq!(
            sa.open_one_impl(&mut p, seq, false),
            OpStatus::AuthFailed,
            "page {}",
            v.page
        );
    }
}
