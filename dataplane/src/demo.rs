//! The self-contained demo behind `espgw-dataplane demo`: two gateways with static SAs, a small
//! generated capture of LAN traffic, and two replays — gateway A encrypts, gateway B decrypts —
//! with the counters of both printed at the end. Nothing leaves the process but files in the
//! output directory (the captures, for tshark or Wireshark).
//!
//! The keys below are demo keys, published here; never use them for real traffic.

#[cfg(test)]
use crate::config;
use crate::config::PortId;
use crate::replay::{self, ReplayError};
use espgw_wire::{ethernet, ip::protocol, ipv4, ipv6, udp};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Gateway A (203.0.113.1, LAN 10.1.0.0/16 and 2001:db8:1::/64).
pub const GATEWAY_A: &str = r#"# espgw demo: gateway A. Demo keys only.
[dataplane]
replay_window = 1024

[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24", "2001:db8:ff::1/64"]

[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["10.1.0.1/16", "2001:db8:1::1/64"]

[[sa]]
name = "to-b-v4"
direction = "out"
spi = 0x00001001
mode = "tunnel"
local = "203.0.113.1"
remote = "203.0.113.2"
encap = { sport = 4500, dport = 4500 }
aead = "aes128gcm16"
key = "0x00112233445566778899aabbccddeeff01020304"
lifetime = { soft_seconds = 100, hard_seconds = 120, hard_bytes = 4_608_000_000 }

[[sa]]
name = "to-b-v6"
direction = "out"
spi = 0x00001002
mode = "tunnel"
local = "2001:db8:ff::1"
remote = "2001:db8:ff::2"
cipher = "aes256-cbc"
integrity = "hmac-sha2-256-128"
key = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
esn = true

[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
action = "protect"
sa = "to-b-v4"

[[policy]]
src = "2001:db8:1::/64"
dst = "2001:db8:2::/64"
action = "protect"
sa = "to-b-v6"

[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"

[[neighbor]]
ip = "2001:db8:ff::2"
mac = "02:00:00:00:0b:01"
"#;

/// Gateway B (203.0.113.2, LAN 10.2.0.0/16 and 2001:db8:2::/64): the mirror of A.
pub const GATEWAY_B: &str = r#"# espgw demo: gateway B. Demo keys only.
[dataplane]
replay_window = 1024

[dataplane.wan]
mac = "02:00:00:00:0b:01"
addresses = ["203.0.113.2/24", "2001:db8:ff::2/64"]

[dataplane.lan]
mac = "02:00:00:00:0b:02"
addresses = ["10.2.0.1/16", "2001:db8:2::1/64"]

[[sa]]
name = "from-a-v4"
direction = "in"
spi = 0x00001001
local = "203.0.113.2"
remote = "203.0.113.1"
encap = { sport = 4500, dport = 4500 }
aead = "aes128gcm16"
key = "0x00112233445566778899aabbccddeeff01020304"
selectors = [{ src = "10.1.0.0/16", dst = "10.2.0.0/16" }]

[[sa]]
name = "from-a-v6"
direction = "in"
spi = 0x00001002
local = "2001:db8:ff::2"
remote = "2001:db8:ff::1"
cipher = "aes256-cbc"
integrity = "hmac-sha2-256-128"
key = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
integrity_key = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
esn = true
selectors = [{ src = "2001:db8:1::/64", dst = "2001:db8:2::/64" }]

[[neighbor]]
ip = "10.2.0.20"
mac = "02:00:00:00:0c:20"

[[neighbor]]
ip = "2001:db8:2::20"
mac = "02:00:00:00:0c:20"
"#;

fn pcap_header() -> PcapHeader {
    PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: 65_535,
        datalink: DataLink::ETHERNET,
        ts_resolution: pcap_file::TsResolution::NanoSecond,
        endianness: pcap_file::Endianness::native(),
    }
}

/// An Ethernet + IPv4 + UDP frame with `payload_len` bytes of payload and correct checksums.
pub fn udp4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload_len: usize,
    ttl: u8,
) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN + payload_len];
    let e = ethernet::HEADER_LEN;
    let mac_gw = ethernet::EthernetAddress([2, 0, 0, 0, 0x0a, 2]);
    let mac_host = ethernet::EthernetAddress([2, 0, 0, 0, 0x0c, 0x10]);
    let _ = ethernet::emit_header(&mut f, mac_gw, mac_host, None, ethernet::ethertype::IPV4);
    let ul = udp::HEADER_LEN + payload_len;
    let h = ipv4::Ipv4Header {
        src,
        dst,
        protocol: protocol::UDP,
        ttl,
        dscp: 0,
        ecn: 0,
        dont_frag: true,
        ident: payload_len as u16,
        payload_len: ul as u16,
    };
    let _ = ipv4::emit_header(&mut f[e..], &h);
    let u = e + ipv4::HEADER_LEN;
    for (i, b) in f[u + udp::HEADER_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let _ = udp::emit_header(&mut f[u..], sport, dport, ul as u16);
    udp::UdpPacket::new_unchecked(&mut f[u..]).fill_checksum_v4(&src, &dst);
    f
}

/// An Ethernet + IPv6 + UDP frame.
pub fn udp6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload_len: usize,
    hops: u8,
) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN + ipv6::HEADER_LEN + udp::HEADER_LEN + payload_len];
    let e = ethernet::HEADER_LEN;
    let mac_gw = ethernet::EthernetAddress([2, 0, 0, 0, 0x0a, 2]);
    let mac_host = ethernet::EthernetAddress([2, 0, 0, 0, 0x0c, 0x10]);
    let _ = ethernet::emit_header(&mut f, mac_gw, mac_host, None, ethernet::ethertype::IPV6);
    let ul = udp::HEADER_LEN + payload_len;
    let h = ipv6::Ipv6Header {
        src,
        dst,
        next_header: protocol::UDP,
        hop_limit: hops,
        traffic_class: 0,
        flow_label: 0,
        payload_len: ul as u16,
    };
    let _ = ipv6::emit_header(&mut f[e..], &h);
    let u = e + ipv6::HEADER_LEN;
    for (i, b) in f[u + udp::HEADER_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let _ = udp::emit_header(&mut f[u..], sport, dport, ul as u16);
    udp::UdpPacket::new_unchecked(&mut f[u..]).fill_checksum_v6(&src, &dst);
    f
}

fn write_pcap(path: &Path, frames: &[(Duration, Vec<u8>)]) -> Result<(), ReplayError> {
    let f = File::create(path).map_err(|e| ReplayError::File {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mut w = PcapWriter::with_header(BufWriter::new(f), pcap_header()).map_err(|e| {
        ReplayError::File {
            path: path.into(),
            message: e.to_string(),
        }
    })?;
    for (ts, d) in frames {
        w.write_packet(&PcapPacket::new(*ts, d.len() as u32, d))
            .map_err(|e| ReplayError::File {
                path: path.into(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

fn read_pcap(path: &Path) -> Result<Vec<(Duration, Vec<u8>)>, ReplayError> {
    let err = |e: &dyn std::fmt::Display| ReplayError::File {
        path: path.into(),
        message: e.to_string(),
    };
    let f = File::open(path).map_err(|e| err(&e))?;
    let mut r = PcapReader::new(BufReader::new(f)).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.map_err(|e| err(&e))?;
        out.push((p.timestamp, p.data.into_owned()));
    }
    Ok(out)
}

/// What the demo did.
#[derive(Debug)]
pub struct DemoResult {
    /// Where the files are.
    pub dir: PathBuf,
    /// Plaintext frames sent into A.
    pub sent: usize,
    /// Plaintext frames that came out of B's LAN port and equal what was sent (with the TTL two
    /// hops lower).
    pub delivered_intact: usize,
    /// A's replay report.
    pub a: serde_json::Value,
    /// B's replay report.
    pub b: serde_json::Value,
}

/// Run the demo, writing configs and captures to `dir`.
pub fn run(dir: &Path) -> Result<DemoResult, ReplayError> {
    std::fs::create_dir_all(dir).map_err(|e| ReplayError::File {
        path: dir.into(),
        message: e.to_string(),
    })?;
    let cfg_a = dir.join("gateway-a.toml");
    let cfg_b = dir.join("gateway-b.toml");
    for (p, t) in [(&cfg_a, GATEWAY_A), (&cfg_b, GATEWAY_B)] {
        std::fs::write(p, t).map_err(|e| ReplayError::File {
            path: p.clone(),
            message: e.to_string(),
        })?;
    }

    // LAN traffic at A: IPv4 and IPv6 flows of many sizes, plus one packet no policy covers.
    let t0 = Duration::from_secs(1_700_000_000);
    let mut lan = Vec::new();
    let h4 = (Ipv4Addr::new(10, 1, 0, 10), Ipv4Addr::new(10, 2, 0, 20));
    let h6: (Ipv6Addr, Ipv6Addr) = (
        "2001:db8:1::10".parse().unwrap_or(Ipv6Addr::LOCALHOST),
        "2001:db8:2::20".parse().unwrap_or(Ipv6Addr::LOCALHOST),
    );
    for i in 0..40usize {
        let ts = t0 + Duration::from_millis(i as u64 * 10);
        let size = [18, 100, 512, 1000, 1300][i % 5] + i % 16;
        if i % 2 == 0 {
            lan.push((ts, udp4_frame(h4.0, h4.1, 40_000, 5001, size, 64)));
        } else {
            lan.push((ts, udp6_frame(h6.0, h6.1, 40_000, 5001, size.min(1300), 64)));
        }
    }
    lan.push((
        t0 + Duration::from_millis(500),
        udp4_frame(h4.0, Ipv4Addr::new(192, 0, 2, 99), 1, 2, 10, 64),
    ));
    let sent = lan.len() - 1;
    let lan_pcap = dir.join("1-lan-at-a.pcap");
    write_pcap(&lan_pcap, &lan)?;

    // A encrypts.
    let wan_pcap = dir.join("2-wan-esp.pcap");
    let a = replay::run(&cfg_a, &lan_pcap, PortId::Lan, &wan_pcap, 32)?;

    // On the wire, an attacker replays one packet and forges another: a copy with a sequence
    // number never used (so it passes the replay check and reaches the ICV check).
    let mut wan = read_pcap(&wan_pcap)?;
    if let Some((ts, f)) = wan.first().cloned() {
        wan.push((ts + Duration::from_millis(600), f.clone()));
        let mut forged = f;
        // ESP-in-UDP over IPv4: the ESP sequence number sits after Ethernet, IP, UDP and SPI.
        let seq_at = ethernet::HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN + 4;
        if let Some(b) = forged.get_mut(seq_at..seq_at + 4) {
            b.copy_from_slice(&1000u32.to_be_bytes());
        }
        wan.push((ts + Duration::from_millis(601), forged));
    }
    let wan_in = dir.join("3-wan-at-b.pcap");
    write_pcap(&wan_in, &wan)?;

    // B decrypts.
    let out_pcap = dir.join("4-lan-at-b.pcap");
    let b = replay::run(&cfg_b, &wan_in, PortId::Wan, &out_pcap, 32)?;

    // Compare: B's LAN output must be A's LAN input with TTL/hop limit two lower (two routers).
    let out = read_pcap(&out_pcap)?;
    let mut intact = 0;
    for ((_, sent), (_, got)) in lan.iter().zip(out.iter()) {
        let e = ethernet::HEADER_LEN;
        if sent.len() != got.len() {
            continue;
        }
        let mut want = sent[e..].to_vec();
        let ok = if want.first().map(|b| b >> 4) == Some(4) {
            let mut p = ipv4::Ipv4Packet::new_unchecked(&mut want[..]);
            p.decrement_ttl() && p.decrement_ttl()
        } else {
            let mut p = ipv6::Ipv6Packet::new_unchecked(&mut want[..]);
            p.decrement_hop_limit() && p.decrement_hop_limit()
        };
        if ok && want == got[e..] {
            intact += 1;
        }
    }
    Ok(DemoResult {
        dir: dir.to_path_buf(),
        sent,
        delivered_intact: intact,
        a: a.json,
        b: b.json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_configs_are_valid() {
        for (t, n) in [(GATEWAY_A, "a"), (GATEWAY_B, "b")] {
            let c = config::parse_str(t, Path::new(n)).unwrap();
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        }
    }

    #[test]
    fn demo_delivers_everything_and_counts_the_attacks() {
        let dir = std::env::temp_dir().join(format!("espgw-demo-test-{}", std::process::id()));
        let r = run(&dir).unwrap();
        assert_eq!(r.sent, 40);
        assert_eq!(r.delivered_intact, 40, "A: {}\nB: {}", r.a, r.b);
        assert_eq!(r.a["counters"]["drops"]["errors"]["no_policy"], 1);
        let errors = &r.b["counters"]["drops"]["errors"];
        assert_eq!(errors["replay"], 1, "{}", r.b);
        assert_eq!(errors["auth_failed"], 1, "{}", r.b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
