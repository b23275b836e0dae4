//! Offline replay: run the captured frames of a pcap/pcapng file through the data plane as if
//! they arrived on one port, and write every frame the data plane emits to a pcap file.
//!
//! The clock is the capture's: SAs are installed at the first frame's timestamp and every burst
//! runs at the timestamp of its first frame, so second-based lifetimes replay deterministically.
//! Dropped frames are counted, never an error: only usage, configuration and file problems are.

use crate::config::{self, ConfigError, PortId};
use crate::counters::DropReason;
use crate::pipeline::{Frame, Pipeline, Verdict};
use crate::sadb::SadbError;
use espgw_crypto::{SoftwareProvider, WorkerCtx};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::{DataLink, TsResolution};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Room in front of every frame for the headers ESP adds.
pub const HEADROOM: usize = 256;
/// Room after every frame for the ESP trailer and ICV.
pub const TAILROOM: usize = 256;
/// Largest frame replay accepts (a frame of a capture with the usual 64 KiB snap length).
pub const MAX_FRAME: usize = 65_535;

/// What went wrong, other than dropped packets.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The configuration could not be installed.
    #[error("{path}: {source}")]
    Install {
        /// Config file.
        path: PathBuf,
        /// Why.
        source: SadbError,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// Which file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ReplayError {
    ReplayError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What a replay run produced.
#[derive(Debug)]
pub struct Report {
    /// Frames read.
    pub frames_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// The JSON report (counters, SAs, events).
    pub json: serde_json::Value,
}

enum Input {
    Pcap(PcapReader<BufReader<File>>),
    PcapNg(PcapNgReader<BufReader<File>>),
}

impl Input {
    fn open(path: &Path) -> Result<Self, ReplayError> {
        let mut f = File::open(path).map_err(|e| file_err(path, e))?;
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic)
            .map_err(|e| file_err(path, format!("not a capture file ({e})")))?;
        f.seek(SeekFrom::Start(0)).map_err(|e| file_err(path, e))?;
        let r = BufReader::new(f);
        if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
            Ok(Input::PcapNg(
                PcapNgReader::new(r).map_err(|e| file_err(path, e))?,
            ))
        } else {
            let rd = PcapReader::new(r).map_err(|e| file_err(path, e))?;
            if rd.header().datalink != DataLink::ETHERNET {
                return Err(file_err(
                    path,
                    format!("link type {:?} is not Ethernet", rd.header().datalink),
                ));
            }
            Ok(Input::Pcap(rd))
        }
    }

    /// Next frame: timestamp and bytes (copied into `out`, which is cleared first).
    fn next(
        &mut self,
        path: &Path,
        out: &mut Vec<u8>,
    ) -> Result<Option<(Duration, usize)>, ReplayError> {
        out.clear();
        match self {
            Input::Pcap(r) => match r.next_packet() {
                None => Ok(None),
                Some(Err(e)) => Err(file_err(path, e)),
                Some(Ok(p)) => {
                    out.extend_from_slice(&p.data);
                    Ok(Some((p.timestamp, p.orig_len as usize)))
                }
            },
            Input::PcapNg(r) => loop {
                match r.next_block() {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(file_err(path, e)),
                    Some(Ok(Block::EnhancedPacket(p))) => {
                        out.extend_from_slice(&p.data);
                        return Ok(Some((p.timestamp, p.original_len as usize)));
                    }
                    Some(Ok(Block::SimplePacket(p))) => {
                        out.extend_from_slice(&p.data);
                        return Ok(Some((Duration::ZERO, p.original_len as usize)));
                    }
                    Some(Ok(Block::InterfaceDescription(i)))
                        if i.linktype != DataLink::ETHERNET =>
                    {
                        return Err(file_err(
                            path,
                            format!("link type {:?} is not Ethernet", i.linktype),
                        ));
                    }
                    Some(Ok(_)) => continue,
                }
            },
        }
    }
}

/// Replay `input` through the configuration at `config_path` as if received on `port`, writing
/// emitted frames to `output`, in bursts of `burst` frames.
pub fn run(
    config_path: &Path,
    input: &Path,
    port: PortId,
    output: &Path,
    burst: usize,
) -> Result<Report, ReplayError> {
    let cfg = config::load(config_path)?;
    run_with_config(cfg, config_path, input, port, output, burst)
}

/// [`run`] with an already parsed configuration.
pub fn run_with_config(
    cfg: config::Config,
    config_path: &Path,
    input: &Path,
    port: PortId,
    output: &Path,
    burst: usize,
) -> Result<Report, ReplayError> {
    let burst = burst.clamp(1, 4096);
    let mut reader = Input::open(input)?;
    let out_file = File::create(output).map_err(|e| file_err(output, e))?;
    let header = PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: (MAX_FRAME + HEADROOM) as u32,
        datalink: DataLink::ETHERNET,
        ts_resolution: TsResolution::NanoSecond,
        endianness: pcap_file::Endianness::native(),
    };
    let mut writer = PcapWriter::with_header(BufWriter::new(out_file), header)
        .map_err(|e| file_err(output, e))?;

    // Read the first burst before installing, so the SAs are installed at capture time.
    let mut bufs: Vec<Vec<u8>> = (0..burst)
        .map(|_| vec![0u8; HEADROOM + MAX_FRAME + TAILROOM])
        .collect();
    let mut scratch = Vec::with_capacity(MAX_FRAME);
    let mut meta: Vec<(Duration, usize)> = Vec::with_capacity(burst);
    let mut oversize: Vec<bool> = Vec::with_capacity(burst);
    let mut fill = |reader: &mut Input,
                    bufs: &mut [Vec<u8>],
                    meta: &mut Vec<(Duration, usize)>,
                    oversize: &mut Vec<bool>|
     -> Result<(), ReplayError> {
        meta.clear();
        oversize.clear();
        for b in bufs.iter_mut() {
            let Some((ts, _orig)) = reader.next(input, &mut scratch)? else {
                break;
            };
            let too_big = scratch.len() > MAX_FRAME;
            let n = scratch.len().min(MAX_FRAME);
            b[HEADROOM..HEADROOM + n].copy_from_slice(&scratch[..n]);
            meta.push((ts, n));
            oversize.push(too_big);
        }
        Ok(())
    };
    fill(&mut reader, &mut bufs, &mut meta, &mut oversize)?;
    let t0 = meta.first().map_or(0, |(ts, _)| ts.as_nanos() as u64);

    let (db, net) =
        config::instantiate(cfg, &SoftwareProvider, t0).map_err(|source| ReplayError::Install {
            path: config_path.to_path_buf(),
            source,
        })?;
    let mut pipe = Pipeline::new(Arc::clone(&db), net, WorkerCtx::new());

    let mut frames_in = 0u64;
    let mut frames_out = 0u64;
    let mut oversize_count = 0u64;
    let mut verdicts = vec![Verdict::Drop(DropReason::Unsupported); burst];
    let mut now = t0;
    while !meta.is_empty() {
        frames_in += meta.len() as u64;
        now = now.max(meta[0].0.as_nanos() as u64);
        db.sweep(now);
        // Frames too big for a buffer are dropped here; the rest go through the pipeline.
        let mut frames: Vec<Frame<'_>> = Vec::with_capacity(meta.len());
        let mut idx: Vec<usize> = Vec::with_capacity(meta.len());
        for (i, (b, (_, n))) in bufs.iter_mut().zip(meta.iter()).enumerate() {
            if oversize[i] {
                oversize_count += 1;
                continue;
            }
            if let Some(f) = Frame::new(b, HEADROOM, *n) {
                frames.push(f);
                idx.push(i);
            }
        }
        let n = frames.len();
        pipe.process(port, &mut frames, &mut verdicts[..n], now);
        let mut write = |ts: Duration, f: &Frame<'_>, v: &Verdict| -> Result<(), ReplayError> {
            if matches!(v, Verdict::TxWan | Verdict::TxLan | Verdict::ToHost) {
                let d = f.data();
                writer
                    .write_packet(&PcapPacket::new(ts, d.len() as u32, d))
                    .map_err(|e| file_err(output, e))?;
                frames_out += 1;
            }
            Ok(())
        };
        let mut split = Vec::new();
        for (f, (v, i)) in frames.iter().zip(verdicts[..n].iter().zip(idx.iter())) {
            let (ts, _) = meta[*i];
            write(ts, f, v)?;
            if let Verdict::Fragment(max) = v {
                split.push((ts, f.data().to_vec(), *max));
            }
        }
        drop(frames);
        // Fragmentation before encryption: the pieces go through the pipeline in their turn.
        for (ts, pkt, max) in split {
            let mut pieces: Vec<(Vec<u8>, usize)> = Vec::new();
            crate::icmp::fragment_frame(&pkt, usize::from(max), |eth, h, d| {
                let len = eth.len() + h.len() + d.len();
                let mut b = vec![0u8; HEADROOM + len + TAILROOM];
                let mut at = HEADROOM;
                for part in [eth, &h[..], d] {
                    b[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
                pieces.push((b, len));
            });
            let mut pf: Vec<Frame<'_>> = pieces
                .iter_mut()
                .filter_map(|(b, l)| Frame::new(b, HEADROOM, *l))
                .collect();
            let mut pv = vec![Verdict::Drop(DropReason::Unsupported); pf.len()];
            pipe.process(port, &mut pf, &mut pv, now);
            for (f, v) in pf.iter().zip(&pv) {
                write(ts, f, v)?;
            }
        }
        fill(&mut reader, &mut bufs, &mut meta, &mut oversize)?;
    }
    db.sweep(now);
    let mut inner = writer.into_writer();
    std::io::Write::flush(&mut inner).map_err(|e| file_err(output, e))?;

    let mut counters = pipe.counters().clone();
    counters.drops.add(DropReason::Oversize, oversize_count);
    let guard = crossbeam_epoch::pin();
    let sas: Vec<_> = db.iter(&guard).map(|sa| sa.to_json(now)).collect();
    let events: Vec<_> = db
        .drain_events()
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect();
    let json = serde_json::json!({
        "input": input.display().to_string(),
        "port": port,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "counters": counters.to_json(),
        "sas": sas,
        "events": events,
        "events_lost": db.events_lost(),
    });
    Ok(Report {
        frames_in,
        frames_out,
        json,
    })
}
