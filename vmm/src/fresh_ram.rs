//! The first write into fresh guest RAM without the kernel clearing each page first.
//!
//! A migration's destination (and a copy-mode restore) maps new anonymous private RAM and then
//! writes the guest's data into it. The first write into each page faults, and the kernel
//! clears the page before the copy overwrites it: measured on the development host, writing
//! 1 GiB of fresh anonymous memory took 0.8-2.4 s where writing it a second time took 0.16 s,
//! and the page clearing was half of the receiver's CPU time.
//!
//! `userfaultfd(2)`'s `UFFDIO_COPY` fills a missing page with the bytes given, in the kernel,
//! with no clearing and no fault: the same 1 GiB took 0.37-0.48 s that way. [`FreshRam`]
//! registers the ranges, copies with it while the pages are missing, and falls back to an
//! ordinary write for a page that already exists (`EEXIST`: written earlier in the same
//! migration, or touched by anything else).
//!
//! **The rule while registered**: nothing else may touch a missing page of the ranges. A
//! registered range's missing page is served only by this module's copies; a fault on it from
//! user mode would wait for a handler that does not exist. So the file descriptor is opened
//! with `UFFD_USER_MODE_ONLY` (a kernel access such as KVM's fails with `EFAULT` instead of
//! waiting) and `UFFD_FEATURE_SIGBUS` (a user-mode access raises `SIGBUS` instead of
//! hanging), and the owner drops [`FreshRam`] (which unregisters) before the guest's state is
//! restored or any vCPU runs. Where the host refuses `userfaultfd` (no permission, an old
//! kernel, a seccomp filter), [`FreshRam::register`] says why and the caller writes normally.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Page size of the copies.
const PAGE: usize = 4096;

/// `userfaultfd(2)` flag: handle faults from user mode only.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// The API version `UFFDIO_API` asks for.
const UFFD_API: u64 = 0xAA;
/// Feature: a user-mode fault on a missing page raises `SIGBUS` instead of waiting.
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFDIO_REGISTER` mode: missing pages.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;

/// The ioctl request numbers, for the seccomp filter of the thread that uses them.
pub const IOCTLS: &[(&str, u64)] = &[
    ("UFFDIO_API", UFFDIO_API),
    ("UFFDIO_REGISTER", UFFDIO_REGISTER),
    ("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER),
    ("UFFDIO_COPY", UFFDIO_COPY),
];

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Host ranges of fresh anonymous private RAM registered for first-fill copies.
#[derive(Debug)]
pub struct FreshRam {
    fd: OwnedFd,
    ranges: Vec<Registered>,
    /// Bytes filled by `UFFDIO_COPY`.
    pub copied: u64,
    /// Bytes written the ordinary way because their page already existed.
    pub rewritten: u64,
}

/// A registered range, `(host address, bytes)`.
#[derive(Clone, Copy, Debug)]
struct Registered(usize, usize);

fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the `#[repr(C)]` struct that `T` is
    // (each constant above is encoded with that struct's size), valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl FreshRam {
    /// Register `ranges` (`(host address, bytes)`, page-aligned, each the whole of a fresh
    /// anonymous private mapping that nothing else touches until this is dropped). The error
    /// says why the host refuses; the caller then writes the ordinary way.
    pub fn register(ranges: &[(usize, usize)]) -> io::Result<Self> {
        for &(addr, len) in ranges {
            if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{addr:#x}+{len:#x} is not a page-aligned range"),
                ));
            }
        }
        // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor the kernel just returned and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_SIGBUS,
            ..Default::default()
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        let mut out = Self {
            fd,
            ranges: Vec::new(),
            copied: 0,
            rewritten: 0,
        };
        for &(addr, len) in ranges {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: addr as u64,
                    len: len as u64,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // On an error `out` drops and unregisters what was registered.
            ioctl(&out.fd, UFFDIO_REGISTER, &mut reg)?;
            if reg.ioctls & (1 << (UFFDIO_COPY & 0xff)) == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{addr:#x}+{len:#x}: the kernel offers no UFFDIO_COPY there"),
                ));
            }
            out.ranges.push(Registered(addr, len));
        }
        Ok(out)
    }

    fn covers(&self, dst: usize, len: usize) -> bool {
        self.ranges.iter().any(|&Registered(a, l)| {
            dst >= a && dst.checked_add(len).is_some_and(|end| end <= a + l)
        })
    }

    /// Write `src` to host address `dst` (page-aligned, `src` whole pages, inside one
    /// registered range): missing pages are filled by `UFFDIO_COPY`, existing ones written
    /// the ordinary way.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` must be memory the caller may write (guest RAM it owns).
    pub unsafe fn write(&mut self, dst: usize, src: &[u8]) -> io::Result<()> {
        if !dst.is_multiple_of(PAGE) || !src.len().is_multiple_of(PAGE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{dst:#x}+{:#x} is not whole pages", src.len()),
            ));
        }
        if !self.covers(dst, src.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{dst:#x}+{:#x} is not in a registered range", src.len()),
            ));
        }
        let mut done = 0;
        while done < src.len() {
            let mut c = UffdioCopy {
                dst: (dst + done) as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            let r = ioctl(&self.fd, UFFDIO_COPY, &mut c);
            // `copy` holds the bytes copied before a failure (or a negative error).
            let copied = usize::try_from(c.copy).unwrap_or(0);
            done += copied;
            self.copied += copied as u64;
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // The page at `done` exists: an ordinary write cannot fault on a missing
                    // page there. Then go on copying after it.
                    let page = &src[done..done + PAGE];
                    // SAFETY: the caller may write `[dst, dst + src.len())`; this page is in
                    // it, and it exists, so the write does not wait on this descriptor.
                    unsafe {
                        std::ptr::copy_nonoverlapping(page.as_ptr(), (dst + done) as *mut u8, PAGE)
                    };
                    done += PAGE;
                    self.rewritten += PAGE as u64;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Environment variable that turns the userfaultfd fill off (`1`): the destination and a
/// copy-mode restore then write received memory the ordinary way. For comparing the two paths
/// (issue 18's nested hangs) and as a way out on a host whose userfaultfd misbehaves.
pub const DISABLE_ENV: &str = "HOURGLASS_NO_USERFAULTFD";

/// Register `ranges` (as [`FreshRam::register`]) if the kernel reports every one of them
/// anonymous private memory, the only kind [`FreshRam`] is for, and [`DISABLE_ENV`] does not
/// turn it off; otherwise why not.
pub fn register_anonymous(ranges: &[(usize, usize)]) -> Result<FreshRam, String> {
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "1") {
        return Err(format!("turned off by {DISABLE_ENV}=1"));
    }
    for &(addr, len) in ranges {
        if let crate::residency::Backing::Other(why) = crate::residency::backing(addr, len) {
            return Err(why);
        }
    }
    FreshRam::register(ranges).map_err(|e| format!("userfaultfd: {e}"))
}

impl Drop for FreshRam {
    fn drop(&mut self) {
        for &Registered(addr, len) in &self.ranges {
            let mut r = UffdioRange {
                start: addr as u64,
                len: len as u64,
            };
            // Closing the descriptor unregisters too; this only makes it explicit.
            let _ = ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Map(*mut u8, usize);
    impl Map {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous private mapping; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self(p.cast(), len)
        }
        fn bytes(&self) -> &[u8] {
            // SAFETY: the mapping is ours, readable and `len` long.
            unsafe { std::slice::from_raw_parts(self.0, self.1) }
        }
    }
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value owns.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / PAGE) as u8 ^ (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn copies_into_missing_pages_and_rewrites_existing_ones() {
        let m = Map::new(64 * PAGE);
        let base = m.0 as usize;
        // Page 5 exists before the copies (written the ordinary way).
        // SAFETY: page 5 is inside the mapping.
        unsafe { *m.0.add(5 * PAGE + 7) = 0x55 };
        let mut fresh = match FreshRam::register(&[(base, 64 * PAGE)]) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: this host refuses userfaultfd: {e}");
                return;
            }
        };
        let data = pattern(16 * PAGE, 1);
        // SAFETY: pages 0..16 of our mapping.
        unsafe { fresh.write(base, &data) }.unwrap();
        assert_eq!(fresh.copied, 15 * PAGE as u64, "page 5 existed");
        assert_eq!(fresh.rewritten, PAGE as u64);
        // Written twice in one migration: the second write lands too.
        let again = pattern(4 * PAGE, 9);
        // SAFETY: pages 2..6 of our mapping.
        unsafe { fresh.write(base + 2 * PAGE, &again) }.unwrap();
        // Outside every registered range, or not whole pages: refused, nothing written.
        // SAFETY: refused before any write.
        assert!(unsafe { fresh.write(base + 64 * PAGE, &data[..PAGE]) }.is_err());
        // SAFETY: refused before any write.
        assert!(unsafe { fresh.write(base + 1, &data[..PAGE]) }.is_err());
        drop(fresh);
        let got = m.bytes();
        assert_eq!(&got[..2 * PAGE], &data[..2 * PAGE]);
        assert_eq!(&got[2 * PAGE..6 * PAGE], &again[..]);
        assert_eq!(&got[6 * PAGE..16 * PAGE], &data[6 * PAGE..]);
        // Never-written pages still read as zero once unregistered (a read no longer waits).
        assert!(got[16 * PAGE..].iter().all(|&b| b == 0));
    }

    #[test]
    fn unaligned_ranges_are_refused_before_any_registration() {
        let e = FreshRam::register(&[(4097, PAGE)]).unwrap_err();
        assert!(e.to_string().contains("page-aligned"), "{e}");
    }
}
