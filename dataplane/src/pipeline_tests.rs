//! Behaviour of the pipeline, gateway against gateway: every header field ESP sets, the
//! DSCP/ECN/DF/TTL rules, transport mode, policies, what goes to the host, VLANs, lifetimes.
//! (The cross-check against an independent implementation is tests/scapy; malformed input is
//! dataplane/tests/malformed.rs.)

use super::*;
use crate::config;
use crate::sa::{EventKind, Limit};
use espgw_crypto::SoftwareProvider;
use espgw_wire::ethernet::EthernetAddress;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

const HEAD: usize = 256;
const KEY: &str = "0x00112233445566778899aabbccddeeff01020304";

fn gateway(text: &str) -> Pipeline {
    let cfg = config::parse_str(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"));
    let (db, net) = config::instantiate(cfg, &SoftwareProvider, 0).unwrap();
    Pipeline::new(db, net, WorkerCtx::from_seed([7; 32]))
}

/// Gateway A: protects 10.1/16 → 10.2/16 with SA "out" (spi 0x1001) towards 203.0.113.2.
fn sender(sa_extra: &str, wan_extra: &str, more: &str) -> Pipeline {
    gateway(&format!(
        r#"
[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24", "2001:db8:ff::1/64"]
{wan_extra}
[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["10.1.0.1/16", "2001:db8:1::1/64"]
[[sa]]
name = "out"
direction = "out"
spi = 0x1001
local = "203.0.113.1"
remote = "203.0.113.2"
aead = "aes128gcm16"
key = "{KEY}"
{sa_extra}
[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
action = "protect"
sa = "out"
[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"
{more}
"#
    ))
}

/// Gateway B: the inbound side of "out".
fn receiver(sa_extra: &str, more: &str) -> Pipeline {
    gateway(&format!(
        r#"
[dataplane.wan]
mac = "02:00:00:00:0b:01"
addresses = ["203.0.113.2/24", "2001:db8:ff::2/64"]
[dataplane.lan]
mac = "02:00:00:00:0b:02"
addresses = ["10.2.0.1/16"]
[[sa]]
name = "in"
direction = "in"
spi = 0x1001
local = "203.0.113.2"
remote = "203.0.113.1"
aead = "aes128gcm16"
key = "{KEY}"
{sa_extra}
[[neighbor]]
ip = "10.2.0.20"
mac = "02:00:00:00:0c:20"
{more}
"#
    ))
}

fn run_many(
    p: &mut Pipeline,
    port: PortId,
    frames: &[Vec<u8>],
    now: u64,
) -> Vec<(Verdict, Vec<u8>)> {
    let mut bufs: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut b = vec![0u8; HEAD + f.len() + 256];
            b[HEAD..HEAD + f.len()].copy_from_slice(f);
            b
        })
        .collect();
    let mut fr: Vec<Frame<'_>> = bufs
        .iter_mut()
        .zip(frames)
        .map(|(b, f)| Frame::new(b, HEAD, f.len()).unwrap())
        .collect();
    let mut v = vec![Verdict::Drop(DropReason::Unsupported); fr.len()];
    p.process(port, &mut fr, &mut v, now);
    v.into_iter()
        .zip(fr.iter().map(|f| f.data().to_vec()))
        .collect()
}

fn run(p: &mut Pipeline, port: PortId, frame: &[u8]) -> (Verdict, Vec<u8>) {
    run_many(p, port, &[frame.to_vec()], 0).remove(0)
}

fn lan4(payload: usize, ttl: u8) -> Vec<u8> {
    crate::demo::udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 2, 0, 20),
        40000,
        5001,
        payload,
        ttl,
    )
}

/// Set DSCP/ECN of the IPv4 packet in an Ethernet frame (fixing the checksum).
fn set_tos(frame: &mut [u8], dscp: u8, ecn_bits: u8) {
    let mut p = ipv4::Ipv4Packet::new_unchecked(&mut frame[ethernet::HEADER_LEN..]);
    p.set_dscp(dscp);
    p.set_ecn(ecn_bits);
    p.fill_checksum();
}

/// The IP packet of `frame` with its TTL lowered by `hops` (checksum fixed).
fn ip_with_ttl_down(frame: &[u8], hops: u8) -> Vec<u8> {
    let mut ip = frame[ethernet::HEADER_LEN..].to_vec();
    let mut p = ipv4::Ipv4Packet::new_unchecked(&mut ip[..]);
    p.set_ttl(p.ttl() - hops);
    p.fill_checksum();
    ip
}

fn outer4(frame: &[u8]) -> ipv4::Ipv4Packet<&[u8]> {
    ipv4::Ipv4Packet::new_checked(&frame[ethernet::HEADER_LEN..]).unwrap()
}

#[test]
fn tunnel_headers_are_right_and_decap_restores_the_packet() {
    let mut a = sender("", "", "");
    let mut b = receiver("", "");
    let mut f = lan4(100, 64);
    set_tos(&mut f, 10, ecn::ECT0);
    let (v, out) = run(&mut a, PortId::Lan, &f);
    assert_eq!(v, Verdict::TxWan);
    let eth = ethernet::EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress([2, 0, 0, 0, 0x0b, 1]));
    assert_eq!(eth.src_addr(), EthernetAddress([2, 0, 0, 0, 0x0a, 1]));
    let ip = outer4(&out);
    assert!(ip.verify_checksum());
    assert_eq!(
        (ip.src_addr(), ip.dst_addr()),
        (Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2))
    );
    assert_eq!(
        (
            ip.next_header(),
            ip.ttl(),
            ip.dscp(),
            ip.ecn(),
            ip.dont_frag()
        ),
        (protocol::ESP, 64, 10, ecn::ECT0, true)
    );
    let inner_len = f.len() - ethernet::HEADER_LEN;
    // AES-GCM pads to whole 16-byte blocks by default (`pad_align`).
    let body = inner_len + esp::pad_len(inner_len, 16) + 2;
    assert_eq!(usize::from(ip.total_len()), 20 + 8 + 8 + body + 16);
    let e = esp::EspPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((e.spi(), e.sequence_number()), (0x1001, 1));
    // GCM IV = the sequence number.
    assert_eq!(&e.payload()[..8], &1u64.to_be_bytes());

    let (v, got) = run(&mut b, PortId::Wan, &out);
    assert_eq!(v, Verdict::TxLan);
    let eth = ethernet::EthernetFrame::new_checked(&got[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress([2, 0, 0, 0, 0x0c, 0x20]));
    assert_eq!(eth.src_addr(), EthernetAddress([2, 0, 0, 0, 0x0b, 2]));
    assert_eq!(
        got[ethernet::HEADER_LEN..],
        ip_with_ttl_down(&f, 2)[..],
        "two router hops, nothing else changed"
    );
    // Counters in Cisco's terms.
    let g = crossbeam_epoch::pin();
    let sa_b = b.db().iter(&g).next().unwrap();
    let s = sa_b.snapshot();
    assert_eq!(
        (s.packets, s.ciphered, s.icv, s.bytes),
        (1, 1, 1, inner_len as u64)
    );
    assert_eq!(b.counters().lan.tx_frames, 1);
}

#[test]
fn dscp_set_df_clear_ecn_compat() {
    let mut a = sender(
        "dscp = 46\ndf = \"clear\"\necn = \"compat\"\nouter_ttl = 9",
        "",
        "",
    );
    let mut f = lan4(50, 64);
    set_tos(&mut f, 10, ecn::ECT0);
    let (v, out) = run(&mut a, PortId::Lan, &f);
    assert_eq!(v, Verdict::TxWan);
    let ip = outer4(&out);
    assert_eq!(
        (ip.dscp(), ip.ecn(), ip.dont_frag(), ip.ttl()),
        (46, ecn::NOT_ECT, false, 9)
    );
    let mut a = sender("df = \"set\"", "", "");
    let mut f = lan4(50, 64);
    ipv4::Ipv4Packet::new_unchecked(&mut f[14..]).set_dont_frag(false);
    ipv4::Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
    assert!(outer4(&run(&mut a, PortId::Lan, &f).1).dont_frag());
    // Copy (the default) follows the inner header.
    let mut a = sender("", "", "");
    assert!(!outer4(&run(&mut a, PortId::Lan, &f).1).dont_frag());
}

#[test]
fn ecn_decapsulation_follows_rfc6040() {
    let mut a = sender("", "", "");
    let mut b = receiver("", "");
    let mark_ce = |frame: &mut Vec<u8>| {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut frame[14..]);
        p.set_ecn(ecn::CE);
        p.fill_checksum();
    };
    // ECT(0) inside, congestion experienced on the way: the inner packet carries CE on.
    let mut f = lan4(60, 64);
    set_tos(&mut f, 0, ecn::ECT0);
    let mut esp_frame = run(&mut a, PortId::Lan, &f).1;
    mark_ce(&mut esp_frame);
    let (v, got) = run(&mut b, PortId::Wan, &esp_frame);
    assert_eq!(v, Verdict::TxLan);
    let inner = ipv4::Ipv4Packet::new_checked(&got[14..]).unwrap();
    assert_eq!(inner.ecn(), ecn::CE);
    assert!(inner.verify_checksum());
    // Not-ECT inside cannot carry CE: dropped.
    let f = lan4(60, 64);
    let mut esp_frame = run(&mut a, PortId::Lan, &f).1;
    mark_ce(&mut esp_frame);
    assert_eq!(
        run(&mut b, PortId::Wan, &esp_frame).0,
        Verdict::Drop(DropReason::EcnDrop)
    );
}

#[test]
fn ttl_expires_on_both_sides() {
    let mut a = sender("", "", "");
    let mut b = receiver("", "");
    assert_eq!(
        run(&mut a, PortId::Lan, &lan4(20, 1)).0,
        Verdict::Drop(DropReason::TtlExceeded)
    );
    let (v, out) = run(&mut a, PortId::Lan, &lan4(20, 2));
    assert_eq!(v, Verdict::TxWan);
    assert_eq!(
        run(&mut b, PortId::Wan, &out).0,
        Verdict::Drop(DropReason::TtlExceeded)
    );
}

fn gre_from_host() -> Vec<u8> {
    // IPv4 203.0.113.1 → 203.0.113.2, protocol GRE, 60 bytes of payload.
    let mut f = vec![0u8; 14 + 20 + 60];
    let _ = ethernet::emit_header(
        &mut f,
        EthernetAddress([2, 0, 0, 0, 0x0b, 1]),
        EthernetAddress([2, 0, 0, 0, 0x0a, 1]),
        None,
        ethernet::ethertype::IPV4,
    );
    let h = ipv4::Ipv4Header {
        src: Ipv4Addr::new(203, 0, 113, 1),
        dst: Ipv4Addr::new(203, 0, 113, 2),
        protocol: protocol::GRE,
        ttl: 255,
        dscp: 0,
        ecn: 0,
        dont_frag: false,
        ident: 7,
        payload_len: 60,
    };
    ipv4::emit_header(&mut f[14..], &h).unwrap();
    for (i, b) in f[34..].iter_mut().enumerate() {
        *b = (i * 3) as u8;
    }
    f
}

const TRANSPORT_OUT: &str = r#"
[[sa]]
name = "gre-out"
direction = "out"
spi = 0x2001
mode = "transport"
local = "203.0.113.1"
remote = "203.0.113.2"
cipher = "3des-cbc"
integrity = "hmac-md5-96"
key = "0x000102030405060708090a0b0c0d0e0f1011121314151617"
integrity_key = "0x000102030405060708090a0b0c0d0e0f"
{encap}
[[policy]]
src = "0.0.0.0/0"
dst = "203.0.113.2"
protocol = "gre"
action = "protect"
sa = "gre-out"
"#;

const TRANSPORT_IN: &str = r#"
[[sa]]
name = "gre-in"
direction = "in"
spi = 0x2001
mode = "transport"
local = "203.0.113.2"
remote = "203.0.113.1"
cipher = "3des-cbc"
integrity = "hmac-md5-96"
key = "0x000102030405060708090a0b0c0d0e0f1011121314151617"
integrity_key = "0x000102030405060708090a0b0c0d0e0f"
{encap}
selectors = [{ src = "203.0.113.1", dst = "203.0.113.2", protocol = "gre" }]
"#;

#[test]
fn transport_mode_gre_from_the_host_round_trips() {
    // DMVPN (seed 002): GRE between the gateways, 3DES/MD5 transport mode, with and without NAT-T.
    for encap in ["", "encap = { sport = 4500, dport = 4500 }"] {
        let mut a = sender("", "", &TRANSPORT_OUT.replace("{encap}", encap));
        let mut b = receiver("", &TRANSPORT_IN.replace("{encap}", encap));
        let f = gre_from_host();
        let (v, out) = run(&mut a, PortId::Host, &f);
        assert_eq!(v, Verdict::TxWan, "{encap}");
        let ip = outer4(&out);
        let want_proto = if encap.is_empty() {
            protocol::ESP
        } else {
            protocol::UDP
        };
        assert_eq!(
            (ip.next_header(), ip.ttl(), ip.ident()),
            (want_proto, 255, 7),
            "header kept, protocol replaced"
        );
        assert!(ip.verify_checksum());
        let (v, got) = run(&mut b, PortId::Wan, &out);
        assert_eq!(v, Verdict::ToHost, "{encap}");
        assert_eq!(
            got[14..],
            f[14..],
            "the host gets the original packet back ({encap})"
        );
    }
    // The same SA never protects forwarded traffic ...
    let mut a = sender("", "", &TRANSPORT_OUT.replace("{encap}", ""));
    let mut forwarded = gre_from_host();
    {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut forwarded[14..]);
        p.set_src_addr(Ipv4Addr::new(10, 1, 0, 10));
        p.fill_checksum();
    }
    assert_eq!(
        run(&mut a, PortId::Lan, &forwarded).0,
        Verdict::Drop(DropReason::TransportNotLocal)
    );
    // ... and a LAN packet claiming the gateway's own address is refused outright.
    assert_eq!(
        run(&mut a, PortId::Lan, &gre_from_host()).0,
        Verdict::Drop(DropReason::Martian)
    );
}

#[test]
fn bypass_discard_and_no_policy() {
    let more = r#"
[[policy]]
src = "10.1.0.0/16"
dst = "192.0.2.0/24"
action = "bypass"
[[policy]]
src = "10.1.0.0/16"
dst = "198.51.100.0/24"
action = "discard"
[[route]]
dst = "0.0.0.0/0"
via = "203.0.113.254"
port = "wan"
[[neighbor]]
ip = "203.0.113.254"
mac = "02:00:00:00:fe:fe"
"#;
    let mut a = sender("", "", more);
    let to = |d: Ipv4Addr| crate::demo::udp4_frame(Ipv4Addr::new(10, 1, 0, 10), d, 1, 2, 30, 64);
    let f = to(Ipv4Addr::new(192, 0, 2, 5));
    let (v, out) = run(&mut a, PortId::Lan, &f);
    assert_eq!(v, Verdict::TxWan);
    assert_eq!(&out[..6], &[2, 0, 0, 0, 0xfe, 0xfe]);
    assert_eq!(&out[6..12], &[2, 0, 0, 0, 0x0a, 1]);
    assert_eq!(out[14..], ip_with_ttl_down(&f, 1)[..]);
    assert_eq!(
        run(&mut a, PortId::Lan, &to(Ipv4Addr::new(198, 51, 100, 1))).0,
        Verdict::Drop(DropReason::PolicyDiscard)
    );
    assert_eq!(
        run(&mut a, PortId::Lan, &to(Ipv4Addr::new(10, 9, 0, 1))).0,
        Verdict::Drop(DropReason::NoPolicy)
    );
}

#[test]
fn what_goes_to_the_host() {
    let mut a = sender("", "", "");
    // ARP on the LAN.
    let mut arp = vec![0u8; 42];
    let _ = ethernet::emit_header(
        &mut arp,
        EthernetAddress::BROADCAST,
        EthernetAddress([2, 0, 0, 0, 0xc, 1]),
        None,
        ethernet::ethertype::ARP,
    );
    assert_eq!(run(&mut a, PortId::Lan, &arp).0, Verdict::ToHost);
    // To the gateway's own LAN address.
    let f = crate::demo::udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 1, 0, 1),
        1,
        22,
        10,
        64,
    );
    assert_eq!(run(&mut a, PortId::Lan, &f).0, Verdict::ToHost);
    // IPv6 multicast (neighbour discovery and friends).
    let f = crate::demo::udp6_frame(
        "2001:db8:1::10".parse().unwrap(),
        "ff02::1".parse().unwrap(),
        1,
        2,
        10,
        255,
    );
    assert_eq!(run(&mut a, PortId::Lan, &f).0, Verdict::ToHost);
    // On the WAN: IKE on 500, anything not ESP, ESP for another address.
    let ike = crate::demo::udp4_frame(
        Ipv4Addr::new(203, 0, 113, 2),
        Ipv4Addr::new(203, 0, 113, 1),
        500,
        500,
        40,
        64,
    );
    assert_eq!(run(&mut a, PortId::Wan, &ike).0, Verdict::ToHost);
    let mut b = receiver("", "");
    let (_, esp_frame) = run(&mut a, PortId::Lan, &lan4(10, 64));
    let mut elsewhere = esp_frame.clone();
    {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut elsewhere[14..]);
        p.set_dst_addr(Ipv4Addr::new(203, 0, 113, 99));
        p.fill_checksum();
    }
    assert_eq!(run(&mut b, PortId::Wan, &elsewhere).0, Verdict::ToHost);
    assert_eq!(run(&mut b, PortId::Wan, &esp_frame).0, Verdict::TxLan);
}

#[test]
fn vlan_tags_out_and_in() {
    let mut a = sender("", "vlan = 100", "");
    let mut b = receiver("", "");
    let (v, out) = run(&mut a, PortId::Lan, &lan4(40, 64));
    assert_eq!(v, Verdict::TxWan);
    let eth = ethernet::EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(
        (eth.vlan_tci(), eth.ethertype(), eth.header_len()),
        (Some(100), ethernet::ethertype::IPV4, 18)
    );
    // A tagged frame is accepted on input.
    assert_eq!(run(&mut b, PortId::Wan, &out).0, Verdict::TxLan);
}

#[test]
fn hard_byte_lifetime_stops_the_sa_mid_burst() {
    // Each inner packet is 128 bytes: 7 fit under 1000 bytes, the 8th would cross it.
    let mut a = sender("lifetime = { soft_bytes = 500, hard_bytes = 1000 }", "", "");
    let frames: Vec<_> = (0..20).map(|_| lan4(100, 64)).collect();
    let res = run_many(&mut a, PortId::Lan, &frames, 5);
    let sent = res.iter().filter(|(v, _)| *v == Verdict::TxWan).count();
    assert_eq!(sent, 7);
    assert!(
        res[7..]
            .iter()
            .all(|(v, _)| *v == Verdict::Drop(DropReason::LifetimeExpired))
    );
    let ev = a.db().drain_events();
    let kinds: Vec<_> = ev.iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&EventKind::SoftExpired {
            limit: Limit::Bytes
        }),
        "{kinds:?}"
    );
    // The hard limit is reached exactly: no packet beyond it was sent.
    let g = crossbeam_epoch::pin();
    assert_eq!(a.db().iter(&g).next().unwrap().snapshot().bytes, 7 * 128);
    drop(g);
    let res = run_many(&mut a, PortId::Lan, &frames[..3], 6);
    assert!(
        res.iter()
            .all(|(v, _)| *v == Verdict::Drop(DropReason::LifetimeExpired))
    );
}

#[test]
fn hard_seconds_lifetime_stops_the_sa() {
    let mut a = sender(
        "lifetime = { soft_seconds = 100, hard_seconds = 120 }",
        "",
        "",
    );
    let f = vec![lan4(10, 64)];
    assert_eq!(
        run_many(&mut a, PortId::Lan, &f, 119_999_999_999)[0].0,
        Verdict::TxWan
    );
    assert_eq!(
        run_many(&mut a, PortId::Lan, &f, 120_000_000_000)[0].0,
        Verdict::Drop(DropReason::LifetimeExpired)
    );
}

#[test]
fn sequence_space_runs_out_without_wrapping() {
    let mut a = sender(&format!("initial_seq = {}", u32::MAX - 2), "", "");
    let frames: Vec<_> = (0..5).map(|_| lan4(10, 64)).collect();
    let res = run_many(&mut a, PortId::Lan, &frames, 0);
    let seqs: Vec<_> = res
        .iter()
        .filter(|(v, _)| *v == Verdict::TxWan)
        .map(|(_, f)| {
            esp::EspPacket::new_checked(outer4(f).payload())
                .unwrap()
                .sequence_number()
        })
        .collect();
    assert_eq!(seqs, vec![u32::MAX - 1, u32::MAX]);
    assert!(
        res[2..]
            .iter()
            .all(|(v, _)| *v == Verdict::Drop(DropReason::SeqExhausted))
    );
}

#[test]
fn a_long_burst_spans_chunks_in_order() {
    let mut a = sender("", "", "");
    let mut b = receiver("", "");
    let frames: Vec<_> = (0..150).map(|i| lan4(10 + i % 40, 64)).collect();
    let res = run_many(&mut a, PortId::Lan, &frames, 0);
    for (i, (v, f)) in res.iter().enumerate() {
        assert_eq!(*v, Verdict::TxWan);
        let seq = esp::EspPacket::new_checked(outer4(f).payload())
            .unwrap()
            .sequence_number();
        assert_eq!(seq as usize, i + 1);
    }
    assert_eq!(a.counters().bursts, 3);
    let esp_frames: Vec<_> = res.into_iter().map(|(_, f)| f).collect();
    let back = run_many(&mut b, PortId::Wan, &esp_frames, 0);
    assert!(back.iter().all(|(v, _)| *v == Verdict::TxLan));
}

#[test]
fn ipv6_outer_with_nat_t_has_a_valid_udp_checksum() {
    let text = r#"
[dataplane.wan]
addresses = ["2001:db8:ff::1/64"]
[dataplane.lan]
addresses = ["10.1.0.1/16"]
[[sa]]
name = "v6"
direction = "out"
spi = 0x3001
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"
encap = { sport = 4500, dport = 4501 }
aead = "aes256gcm8"
key = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223"
[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
action = "protect"
sa = "v6"
[[neighbor]]
ip = "2001:db8:ff::2"
mac = "02:00:00:00:0b:01"
"#;
    let mut a = gateway(text);
    let (v, out) = run(&mut a, PortId::Lan, &lan4(77, 64));
    assert_eq!(v, Verdict::TxWan);
    let ip = ipv6::Ipv6Packet::new_checked(&out[14..]).unwrap();
    assert_eq!((ip.next_header(), ip.hop_limit()), (protocol::UDP, 64));
    let u = udp::UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((u.src_port(), u.dst_port()), (4500, 4501));
    assert_ne!(u.checksum(), 0);
    let (s, d): (Ipv6Addr, Ipv6Addr) = (ip.src_addr(), ip.dst_addr());
    assert!(u.verify_checksum_v6(&s, &d));
}

#[test]
fn df_packet_too_big_for_the_tunnel_gets_frag_needed_with_the_mtu_that_fits() {
    let mut a = sender("", "mtu = 1400", "");
    // GCM-16 tunnel over IPv4 without NAT-T: 20 + 8 + 8 + pad(inner + 2, 16) + 16 <= 1400
    // => inner + 2 <= 1344 => the largest inner packet is 1342 bytes.
    let fits = lan4(1342 - 28, 64);
    assert_eq!(run(&mut a, PortId::Lan, &fits).0, Verdict::TxWan);
    let big = lan4(1343 - 28, 64);
    let (v, out) = run(&mut a, PortId::Lan, &big);
    assert_eq!(v, Verdict::TxLan, "answered, back towards the sender");
    let eth = ethernet::EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress([2, 0, 0, 0, 0x0c, 0x10]));
    assert_eq!(eth.src_addr(), EthernetAddress([2, 0, 0, 0, 0x0a, 2]));
    let ip = outer4(&out);
    assert!(ip.verify_checksum());
    assert_eq!(
        (ip.src_addr(), ip.dst_addr(), ip.next_header()),
        (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 10), 1)
    );
    let icmp = ip.payload();
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "fragmentation needed and DF set"
    );
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1342);
    assert_eq!(checksum::sum(icmp), 0xffff);
    assert_eq!(&icmp[8..28], &big[14..34], "quotes the original IP header");
    assert_eq!(a.counters().icmp_sent, 1);
    // Answered, so neither the worker nor the SA counts it as dropped.
    assert_eq!(a.db().sa_drops(DropReason::MtuExceeded), 0);
    assert_eq!(a.counters().drops.get(DropReason::MtuExceeded), 0);

    // Without DF it is fragmented before encryption (the default): to at most the size that
    // fits; or, with fragmentation off, dropped and counted.
    let mut no_df = big.clone();
    {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut no_df[ethernet::HEADER_LEN..]);
        p.set_dont_frag(false);
        p.fill_checksum();
    }
    let (v, _) = run(&mut a, PortId::Lan, &no_df);
    assert_eq!(v, Verdict::Fragment(1342));
    assert_eq!(a.counters().prefragmented, 1);
    assert_eq!(a.counters().icmp_sent, 1);
    let mut off = sender("", "mtu = 1400", "[dataplane]\nfragmentation = \"off\"");
    let (v, _) = run(&mut off, PortId::Lan, &no_df);
    assert_eq!(v, Verdict::Drop(DropReason::MtuExceeded));
    assert_eq!(off.counters().icmp_sent, 0);
}

/// A TCP SYN 10.1.0.10:40000 → 10.2.0.20:443 with MSS 1460 (and 8 bytes of data).
fn tcp_syn4() -> Vec<u8> {
    let mut f = lan4(24, 64);
    let e = ethernet::HEADER_LEN;
    f[e + 9] = protocol::TCP;
    let t = e + 20;
    f[t..t + 44 - 20].fill(0);
    f[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
    f[t + 2..t + 4].copy_from_slice(&443u16.to_be_bytes());
    f[t + 12] = 6 << 4; // 24-byte header
    f[t + 13] = 0x02; // SYN
    f[t + 20..t + 24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let src = Ipv4Addr::new(10, 1, 0, 10);
    let dst = Ipv4Addr::new(10, 2, 0, 20);
    {
        let mut p = ipv4::Ipv4Packet::new_unchecked(&mut f[e..]);
        p.fill_checksum();
    }
    let sum = checksum::combine(&[
        checksum::pseudo_header_v4(&src, &dst, protocol::TCP, (f.len() - t) as u32),
        checksum::sum(&f[t..]),
    ]);
    f[t + 16..t + 18].copy_from_slice(&(!sum).to_be_bytes());
    f
}

fn tcp_mss_and_checksum_ok(frame: &[u8]) -> (u16, bool) {
    let ip = outer4(frame);
    let t = ip.payload();
    let ok = checksum::combine(&[
        checksum::pseudo_header_v4(
            &ip.src_addr(),
            &ip.dst_addr(),
            protocol::TCP,
            t.len() as u32,
        ),
        checksum::sum(t),
    ]) == 0xffff;
    (u16::from_be_bytes([t[22], t[23]]), ok)
}

#[test]
fn tcp_mss_is_clamped_both_ways_when_configured() {
    // Outbound: clamped before encryption, so the receiver (not clamping) sees the new value.
    let mut a = sender("", "", "[dataplane]\ntcp_mss = 1360");
    let mut b = receiver("", "");
    let (v, esp) = run(&mut a, PortId::Lan, &tcp_syn4());
    assert_eq!(v, Verdict::TxWan);
    let (v, got) = run(&mut b, PortId::Wan, &esp);
    assert_eq!(v, Verdict::TxLan);
    assert_eq!(tcp_mss_and_checksum_ok(&got), (1360, true));

    // Inbound: the receiver clamps after decryption.
    let mut a = sender("", "", "");
    let mut b = receiver("", "[dataplane]\ntcp_mss = 1300");
    let (_, esp) = run(&mut a, PortId::Lan, &tcp_syn4());
    let (v, got) = run(&mut b, PortId::Wan, &esp);
    assert_eq!(v, Verdict::TxLan);
    assert_eq!(tcp_mss_and_checksum_ok(&got), (1300, true));

    // Not configured: untouched.
    let mut a = sender("", "", "");
    let mut b = receiver("", "");
    let (_, esp) = run(&mut a, PortId::Lan, &tcp_syn4());
    let (_, got) = run(&mut b, PortId::Wan, &esp);
    assert_eq!(tcp_mss_and_checksum_ok(&got), (1460, true));
}

#[test]
fn forward_mode_routes_both_ways_without_ipsec() {
    let mut g = gateway(
        r#"
[dataplane]
mode = "forward"
[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24"]
[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["10.1.0.1/16"]
[[route]]
dst = "10.2.0.0/16"
via = "203.0.113.2"
port = "wan"
[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"
[[neighbor]]
ip = "10.1.0.10"
mac = "02:00:00:00:0c:10"
"#,
    );
    let f = lan4(100, 64);
    let (v, out) = run(&mut g, PortId::Lan, &f);
    assert_eq!(v, Verdict::TxWan);
    let eth = ethernet::EthernetFrame::new_checked(&out[..]).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress([2, 0, 0, 0, 0x0b, 1]));
    assert_eq!(out[ethernet::HEADER_LEN..], ip_with_ttl_down(&f, 1)[..]);
    // The other way: plaintext arriving on the WAN port is routed too (no ESP expected).
    let back = crate::demo::udp4_frame(
        Ipv4Addr::new(10, 2, 0, 20),
        Ipv4Addr::new(10, 1, 0, 10),
        5001,
        40000,
        64,
        64,
    );
    let (v, out) = run(&mut g, PortId::Wan, &back);
    assert_eq!(v, Verdict::TxLan);
    assert_eq!(out[ethernet::HEADER_LEN..], ip_with_ttl_down(&back, 1)[..]);
    // Traffic for the gateway itself still goes to the host.
    let mine = crate::demo::udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 1, 0, 1),
        5001,
        22,
        64,
        64,
    );
    assert_eq!(run(&mut g, PortId::Lan, &mine).0, Verdict::ToHost);
}

/// Rewrites the outer IPv4 source and UDP source port of an ESP-in-UDP frame (a NAT on the way).
fn nat_rewrite(frame: &[u8], src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    let mut ip = ipv4::Ipv4Packet::new_unchecked(&mut f[ethernet::HEADER_LEN..]);
    ip.set_src_addr(src);
    ip.fill_checksum();
    let at = ethernet::HEADER_LEN + 20;
    f[at..at + 2].copy_from_slice(&sport.to_be_bytes());
    // IPv4 ESP-in-UDP goes with a zero UDP checksum (RFC 3948 §2.1): nothing else to fix.
    f
}

#[test]
fn nat_rebinding_is_reported_once_and_only_for_authenticated_packets() {
    const NATT: &str = "encap = { sport = 4500, dport = 4500 }";
    let mut a = sender(NATT, "", "");
    let mut b = receiver(NATT, "");
    let sealed: Vec<_> = (0..3)
        .map(|_| {
            let (v, out) = run(&mut a, PortId::Lan, &lan4(60, 64));
            assert_eq!(v, Verdict::TxWan);
            out
        })
        .collect();
    // From the configured peer: the first packet is news, the mapping is not.
    assert_eq!(run(&mut b, PortId::Wan, &sealed[0]).0, Verdict::TxLan);
    let kinds: Vec<_> = b.db().drain_events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::FirstPacket]);
    // A forged packet from a new mapping (bad ICV) moves nothing and reports nothing.
    let moved = Ipv4Addr::new(192, 0, 2, 50);
    let mut forged = nat_rewrite(&sealed[1], moved, 31000);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        run(&mut b, PortId::Wan, &forged).0,
        Verdict::Drop(DropReason::AuthFailed)
    );
    assert!(b.db().drain_events().is_empty());
    // The real peer behind the new mapping: reported once, with the new address and port.
    for f in &sealed[1..] {
        let (v, _) = run(&mut b, PortId::Wan, &nat_rewrite(f, moved, 31000));
        assert_eq!(v, Verdict::TxLan);
    }
    let kinds: Vec<_> = b.db().drain_events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::NatMappingChanged {
            src: IpAddr::V4(moved),
            sport: 31000
        }]
    );
}

#[test]
fn unknown_spi_is_reported_with_its_source() {
    const NATT: &str = "encap = { sport = 4500, dport = 4500 }";
    let mut a = sender(NATT, "", "");
    let mut b = receiver("", "");
    let (_, out) = run(&mut a, PortId::Lan, &lan4(60, 64));
    let mut f = nat_rewrite(&out, Ipv4Addr::new(192, 0, 2, 77), 1234);
    // An SPI b does not have.
    let spi_at = ethernet::HEADER_LEN + 20 + 8;
    f[spi_at..spi_at + 4].copy_from_slice(&0xdead_u32.to_be_bytes());
    assert_eq!(
        run(&mut b, PortId::Wan, &f).0,
        Verdict::Drop(DropReason::UnknownSpi)
    );
    let got = b.db().drain_unknown_spi();
    assert_eq!(got.len(), 1, "{got:?}");
    let u = got[0];
    assert_eq!(
        (u.spi, u.src, u.dst, u.sport, u.dport),
        (
            0xdead,
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)),
            1234,
            4500
        )
    );
}
