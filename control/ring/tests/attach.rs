//! What `Segment::create` makes and what `Segment::attach` refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use espgw_ring::segment::{MAGIC, VERSION, layout};
use espgw_ring::*;
use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_at(bytes, off).unwrap();
}

fn attach_err(path: &Path) -> SegmentError {
    Segment::attach(path).unwrap_err()
}

#[test]
fn create_makes_a_0600_file_of_the_right_size_with_the_header() {
    let p = ShmPath::new("create");
    let params = small_params(16, 32);
    let dp = Segment::create(p.path(), params).unwrap();
    let meta = std::fs::metadata(p.path()).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), params.segment_size());
    assert_eq!(params.segment_size(), 256 + 512 + 512 * 48);
    let bytes = std::fs::read(p.path()).unwrap();
    assert_eq!(&bytes[..8], &MAGIC);
    assert_eq!(&bytes[8..12], &VERSION.to_le_bytes());
    assert_eq!(&bytes[16..20], &512u32.to_le_bytes());
    assert_eq!(&bytes[20..24], &16u32.to_le_bytes());
    assert_eq!(&bytes[24..28], &32u32.to_le_bytes());
    assert_eq!(&bytes[40..48], &dp.dp_generation().to_le_bytes());
    assert_eq!(&bytes[48..52], &std::process::id().to_le_bytes());
    assert_eq!(
        layout::ring_ctl(&params, RingDir::FromDataPlane),
        512 + 16 * 512
    );

    let control = Segment::attach(p.path()).unwrap();
    assert_eq!(control.params(), params);
    assert_eq!(control.side(), Side::Control);
    assert_eq!(dp.side(), Side::DataPlane);
}

#[test]
fn create_replaces_a_stale_segment() {
    let p = ShmPath::new("stale");
    std::fs::write(p.path(), b"left over by a data plane killed with -9").unwrap();
    let dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    let control = Segment::attach(p.path()).unwrap();
    assert_eq!(control.dp_generation(), dp.dp_generation());
}

#[test]
fn bad_parameters_are_refused() {
    let p = ShmPath::new("params");
    for (params, text) in [
        (
            small_params(3, 8),
            "to-data-plane ring: 3 slots is not a power of two",
        ),
        (
            small_params(8, 1),
            "from-data-plane ring: 1 slots is not a power of two",
        ),
        (
            RingParams {
                record_size: 448,
                to_dp_slots: 8,
                from_dp_slots: 8,
            },
            "record size 448 is not a multiple of 64 in 512…65536",
        ),
        (
            RingParams {
                record_size: 65536,
                to_dp_slots: 1 << 14,
                from_dp_slots: 8,
            },
            "exceeds 1073741824",
        ),
    ] {
        let e = Segment::create(p.path(), params).unwrap_err().to_string();
        assert!(e.contains(text), "{e}");
        assert!(!p.path().exists());
    }
}

#[test]
fn wrong_magic_is_not_an_espgw_ring() {
    let p = ShmPath::new("magic");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    poke(p.path(), 0, b"SOMETHNG");
    let e = attach_err(p.path());
    assert!(matches!(e, SegmentError::NotARing { found, .. } if &found == b"SOMETHNG"));
    assert!(e.to_string().contains("not an espgw ring"), "{e}");
}

#[test]
fn a_half_created_segment_is_not_ready() {
    let p = ShmPath::new("notready");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    poke(p.path(), 0, &[0; 8]);
    let e = attach_err(p.path());
    assert!(matches!(e, SegmentError::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("retry"));

    // An empty file (created, not yet truncated to size).
    let q = ShmPath::new("empty");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(q.path())
        .unwrap();
    assert!(matches!(
        attach_err(q.path()),
        SegmentError::NotReady { .. }
    ));
}

#[test]
fn another_version_is_refused_with_both_numbers() {
    let p = ShmPath::new("version");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    poke(p.path(), 8, &2u32.to_le_bytes());
    let e = attach_err(p.path());
    assert!(
        matches!(
            e,
            SegmentError::Version {
                found: 2,
                ours: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().ends_with("version 2, this program speaks 1"),
        "{e}"
    );
}

#[test]
fn a_mode_wider_than_0600_is_refused() {
    let p = ShmPath::new("mode");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o700, 0o4600] {
        std::fs::set_permissions(p.path(), Permissions::from_mode(mode)).unwrap();
        let e = attach_err(p.path());
        assert!(
            matches!(e, SegmentError::Mode { mode: m, .. } if m == mode),
            "{mode:o}: {e}"
        );
        assert!(e.to_string().contains("wider than 0600"), "{e}");
    }
    std::fs::set_permissions(p.path(), Permissions::from_mode(0o600)).unwrap();
    Segment::attach(p.path()).unwrap();
}

#[test]
fn a_segment_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let p = ShmPath::new("owner");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    std::os::unix::fs::chown(p.path(), Some(65534), None).unwrap();
    let e = attach_err(p.path());
    assert!(
        matches!(
            e,
            SegmentError::Owner {
                owner: 65534,
                ours: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn symlinks_and_non_files_are_refused() {
    let p = ShmPath::new("target");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    let link = ShmPath::new("link");
    std::os::unix::fs::symlink(p.path(), link.path()).unwrap();
    let e = attach_err(link.path());
    assert!(matches!(e, SegmentError::Io { op: "open", .. }), "{e}");
    let e = attach_err(Path::new("/dev/shm"));
    assert!(
        matches!(e, SegmentError::Io { .. } | SegmentError::NotAFile { .. }),
        "{e}"
    );
    let e = attach_err(Path::new("/dev/shm/espgw-ring-test-does-not-exist"));
    assert!(
        matches!(e, SegmentError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
}

#[test]
fn header_and_size_mismatches_are_refused() {
    let p = ShmPath::new("size");
    let params = small_params(8, 8);
    let _dp = Segment::create(p.path(), params).unwrap();
    // A truncated file.
    let f = OpenOptions::new().write(true).open(p.path()).unwrap();
    f.set_len(params.segment_size() - 512).unwrap();
    let e = attach_err(p.path());
    assert!(matches!(e, SegmentError::Size { .. }), "{e}");
    f.set_len(params.segment_size()).unwrap();
    Segment::attach(p.path()).unwrap();
    // Slot counts that do not match the size field.
    poke(p.path(), layout::TO_DP_SLOTS as u64, &16u32.to_le_bytes());
    let e = attach_err(p.path());
    assert!(e.to_string().contains("segment size field"), "{e}");
    poke(p.path(), layout::TO_DP_SLOTS as u64, &7u32.to_le_bytes());
    let e = attach_err(p.path());
    assert!(
        e.to_string().contains("7 slots is not a power of two"),
        "{e}"
    );
}

#[test]
fn a_second_control_process_is_busy() {
    let p = ShmPath::new("busy");
    let _dp = Segment::create(p.path(), small_params(8, 8)).unwrap();
    let first = Segment::attach(p.path()).unwrap();
    let e = attach_err(p.path());
    assert!(
        matches!(
            e,
            SegmentError::Busy {
                side: "control",
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("another control process is attached")
    );
    drop(first);
    Segment::attach(p.path()).unwrap();
}

#[test]
fn a_second_data_plane_does_not_replace_a_live_segment() {
    let p = ShmPath::new("dpbusy");
    let first = Segment::create(p.path(), small_params(8, 8)).unwrap();
    let e = Segment::create(p.path(), small_params(8, 8)).unwrap_err();
    assert!(
        matches!(
            e,
            SegmentError::Busy {
                side: "data plane",
                ..
            }
        ),
        "{e}"
    );
    let control = Segment::attach(p.path()).unwrap();
    assert!(
        control.is_current(),
        "the first data plane's segment is still there"
    );
    drop(first);
    let second = Segment::create(p.path(), small_params(8, 8)).unwrap();
    assert_ne!(second.dp_generation(), control.dp_generation());
}
