//! Replay mode fragments non-DF IPv4 packets too big for their tunnel before encryption, as
//! the live gateway does: the pieces come out as separate ESP packets, in order.

use espgw_dataplane::config::PortId;
use espgw_dataplane::demo::udp4_frame;
use espgw_dataplane::replay;
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use std::net::Ipv4Addr;
use std::time::Duration;

#[test]
fn oversize_non_df_packet_leaves_as_two_esp_packets() {
    let dir = std::env::temp_dir().join(format!("espgw-replay-frag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gw.toml");
    std::fs::write(
        &cfg,
        r#"
[dataplane.wan]
mac = "02:00:00:00:0a:01"
addresses = ["203.0.113.1/24"]
[dataplane.lan]
mac = "02:00:00:00:0a:02"
addresses = ["10.1.0.1/16"]
[[sa]]
name = "out"
direction = "out"
spi = 0x1001
local = "203.0.113.1"
remote = "203.0.113.2"
aead = "aes128gcm16"
key = "0x00112233445566778899aabbccddeeff01020304"
[[policy]]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
action = "protect"
sa = "out"
[[neighbor]]
ip = "203.0.113.2"
mac = "02:00:00:00:0b:01"
"#,
    )
    .unwrap();
    // 1500-byte IP packet without DF.
    let mut f = udp4_frame(
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 2, 0, 20),
        40000,
        5001,
        1472,
        64,
    );
    f[20] &= !0x40; // clear DF
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = espgw_wire::checksum::sum(&f[14..34]);
    f[24..26].copy_from_slice(&(!sum).to_be_bytes());
    let input = dir.join("in.pcap");
    let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
    w.write_packet(&PcapPacket::new(Duration::from_secs(1), f.len() as u32, &f))
        .unwrap();
    drop(w);
    let output = dir.join("out.pcap");
    let r = replay::run(&cfg, &input, PortId::Lan, &output, 32).unwrap();
    assert_eq!((r.frames_in, r.frames_out), (1, 2), "{}", r.json);
    assert_eq!(r.json["counters"]["prefragmented"], 1);
    let mut rd = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let mut seqs = Vec::new();
    while let Some(p) = rd.next_packet() {
        let p = p.unwrap();
        let d = &p.data;
        assert!(d.len() - 14 <= 1500, "each ESP packet fits the MTU");
        assert_eq!(d[14 + 9], 50, "ESP");
        seqs.push(u32::from_be_bytes([d[38], d[39], d[40], d[41]]));
    }
    assert_eq!(seqs, vec![1, 2]);
    std::fs::remove_dir_all(&dir).unwrap();
}
