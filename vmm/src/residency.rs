//! Which pages of guest RAM can hold data, known without reading them.
//!
//! A page of an **anonymous private** mapping that the kernel has never populated reads as
//! zero: the kernel guarantees it, and it is the only kind of memory where it does. For those
//! regions [`scan`] asks the kernel, per 4 KiB page, whether the page is present or swapped out
//! (`/proc/self/pagemap` bits 63 and 62, or by region with its `PAGEMAP_SCAN` ioctl where the
//! kernel has it) or resident (`mincore(2)`); a page that is none of these is zero and need not
//! be read. A swapped-out page is **not** zero.
//!
//! Every other kind of memory is refused, explicitly: a `MAP_PRIVATE` mapping of a file (a
//! restored VM's `memory.bin`) reads the file's content where it was never touched, and shared
//! memory (`MAP_SHARED`, memfd, shmem) can be written by another process and is only reported
//! present once *this* process maps it. For them every page is reported as possibly holding data,
//! as is every page when the kernel's answer cannot be read. The region's kind is taken from the
//! kernel (`/proc/self/maps`), not from how the VMM meant to map it.
//!
//! A caller that scans a running guest must turn dirty logging on **before** calling [`scan`]:
//! a page that is absent at the scan and written afterwards is then in the dirty log.
//!
//! Threads whose seccomp filter refuses `open` (the migration sender) use the files that
//! [`Prober::shared`] opened earlier on a thread that may open them (the control thread opens
//! them before it starts a sender).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The page size the answers are given in.
pub const PAGE: usize = 4096;

/// What the kernel says a host mapping is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous and private throughout: a never-populated page reads as zero.
    AnonymousPrivate,
    /// Anything else (file-backed, shared, or not wholly mapped), with the reason.
    Other(String),
}

/// Pages of one host range that may hold data (one bit per page, set: read it).
#[derive(Clone, Debug)]
pub struct Residency {
    bits: Vec<u64>,
    pages: usize,
    /// Why unread pages must be read anyway (`None`: the kernel's per-page answer is used).
    pub refused: Option<String>,
}

impl Residency {
    /// Every page may hold data (nothing can be skipped).
    pub fn all(pages: usize, why: impl Into<String>) -> Self {
        let mut bits = vec![u64::MAX; pages.div_ceil(64)];
        if !pages.is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        Self {
            bits,
            pages,
            refused: Some(why.into()),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Whether page `i` may hold data (out of range: true).
    pub fn may_hold_data(&self, i: usize) -> bool {
        i >= self.pages || self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    /// Pages that may hold data.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The end of the run of pages starting at `i` that share `i`'s answer, at most `max` long.
    pub fn run_end(&self, i: usize, max: usize) -> usize {
        let want = self.may_hold_data(i);
        let limit = self.pages.min(i.saturating_add(max));
        let mut j = i + 1;
        while j < limit {
            // Whole words at once where they agree.
            if j.is_multiple_of(64) && j + 64 <= limit {
                let w = self.bits[j / 64];
                if (want && w == u64::MAX) || (!want && w == 0) {
                    j += 64;
                    continue;
                }
            }
            if self.may_hold_data(j) != want {
                break;
            }
            j += 1;
        }
        j
    }
}

/// `/proc/self/maps` and `/proc/self/pagemap`, open: the kernel's answers, read with `pread`.
#[derive(Debug)]
pub struct Prober {
    maps: File,
    pagemap: File,
}

static SHARED: std::sync::OnceLock<Prober> = std::sync::OnceLock::new();

impl Prober {
    /// Open both files.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            maps: File::open("/proc/self/maps")?,
            pagemap: File::open("/proc/self/pagemap")?,
        })
    }

    /// The process's prober, opened by the first call that can open it (a failure is not
    /// remembered: a later call on a thread that may open files tries again).
    pub fn shared() -> io::Result<&'static Self> {
        if let Some(p) = SHARED.get() {
            return Ok(p);
        }
        let p = Self::open()?;
        Ok(SHARED.get_or_init(|| p))
    }

    /// The current text of `/proc/self/maps`.
    fn maps(&self) -> io::Result<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = self.maps.read_at(&mut buf, out.len() as u64)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).map_err(io::Error::other)
    }

    /// [`backing`] with these files.
    pub fn backing(&self, addr: usize, len: usize) -> Backing {
        match self.maps() {
            Ok(maps) => backing_from_maps(&maps, addr, len),
            Err(e) => Backing::Other(format!("cannot read /proc/self/maps: {e}")),
        }
    }

    /// [`scan`] with these files.
    pub fn scan(&self, addr: usize, len: usize) -> Residency {
        let pages = len / PAGE;
        if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Residency::all(pages, "the range is not page aligned");
        }
        match self.backing(addr, len) {
            Backing::AnonymousPrivate => {}
            Backing::Other(why) => return Residency::all(pages, why),
        }
        match kernel_answer(&self.pagemap, addr, pages) {
            Ok(bits) => Residency {
                bits,
                pages,
                refused: None,
            },
            Err(e) => Residency::all(pages, format!("cannot ask the kernel: {e}")),
        }
    }
}

/// The kernel's view of the host range `[addr, addr + len)`, from `/proc/self/maps`: anonymous
/// private only if every mapping covering it is private with no file (inode 0, no name) and the
/// mappings cover the whole range.
pub fn backing(addr: usize, len: usize) -> Backing {
    match Prober::shared() {
        Ok(p) => p.backing(addr, len),
        Err(e) => Backing::Other(format!("cannot open /proc/self/maps: {e}")),
    }
}

/// [`backing`] over the text of a `maps` file.
pub fn backing_from_maps(maps: &str, addr: usize, len: usize) -> Backing {
    let end = match addr.checked_add(len) {
        Some(e) => e,
        None => return Backing::Other("the range overflows".into()),
    };
    let mut covered = addr;
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let name = f.collect::<Vec<_>>().join(" ");
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        if hi <= covered || lo >= end {
            continue;
        }
        if lo > covered {
            return Backing::Other(format!("{covered:#x}..{lo:#x} is not mapped"));
        }
        if perms.as_bytes().get(3) != Some(&b'p') {
            return Backing::Other(format!("{lo:#x}-{hi:#x} is a shared mapping ({perms})"));
        }
        if inode != "0" || !name.is_empty() {
            return Backing::Other(format!(
                "{lo:#x}-{hi:#x} is backed by {}",
                if name.is_empty() { "a file" } else { &name }
            ));
        }
        covered = hi;
        if covered >= end {
            return Backing::AnonymousPrivate;
        }
    }
    Backing::Other(format!("{covered:#x}..{end:#x} is not mapped"))
}

/// Pagemap bit: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap bit: the page is in swap.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read at once.
const PAGEMAP_BATCH: usize = 64 * 1024;

/// Which pages of `[addr, addr + len)` (page aligned, mapped by this process for as long as the
/// call runs) may hold data. Anonymous private memory: the pages that are resident, present
/// or swapped out; any other memory, or a kernel answer that cannot be read: every page.
pub fn scan(addr: usize, len: usize) -> Residency {
    match Prober::shared() {
        Ok(p) => p.scan(addr, len),
        Err(e) => Residency::all(
            len / PAGE,
            format!("cannot open the kernel's page map: {e}"),
        ),
    }
}

/// Whether a page may hold data, from its `mincore` byte and its pagemap entry: resident,
/// present, or swapped out (a swapped-out page is not resident and not zero).
fn may_hold_data(mincore: u8, pagemap: u64) -> bool {
    mincore & 1 != 0 || pagemap & (PM_PRESENT | PM_SWAPPED) != 0
}

/// `PAGEMAP_SCAN` (Linux 6.7): `_IOWR('f', 16, struct pm_scan_arg)`, an ioctl of the pagemap
/// file.
pub const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
/// `PAGEMAP_SCAN` category: the page is present.
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGEMAP_SCAN` category: the page is swapped out.
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Regions one `PAGEMAP_SCAN` call may return.
const SCAN_REGIONS: usize = 512;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: `[start, end)` whose pages share `categories`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// The pages of `[addr, addr + pages * PAGE)` that are present or swapped out, as
/// `PAGEMAP_SCAN` gives them: region by region, the kernel walking the page tables and
/// skipping what is empty, so the answer costs what the guest populated, not the size of its
/// RAM (reading `pagemap` costs 8 bytes a page, 8 MiB for 4 GiB). Present or swapped covers
/// what `mincore` says of anonymous memory (a resident page is mapped, or a swap entry in the
/// swap cache). `Ok(None)` where the kernel refuses the first call (no `PAGEMAP_SCAN` before
/// Linux 6.7): the caller reads `pagemap` instead.
fn scan_regions(pagemap: &File, addr: usize, pages: usize) -> io::Result<Option<Vec<u64>>> {
    use std::os::fd::AsRawFd;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut regions = [PageRegion::default(); SCAN_REGIONS];
    let end = (addr + pages * PAGE) as u64;
    let mut start = addr as u64;
    while start < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: SCAN_REGIONS as u64,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into
        // `regions`, both alive for the call; it reads this process's page tables only.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if start == addr as u64 {
                Ok(None)
            } else {
                Err(e)
            };
        }
        for r in regions.iter().take(n as usize) {
            let first = (r.start.saturating_sub(addr as u64) / PAGE as u64) as usize;
            let last = ((r.end.min(end).saturating_sub(addr as u64)) / PAGE as u64) as usize;
            for i in first..last.min(pages) {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        if arg.walk_end <= start || arg.walk_end > end {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN stopped at {:#x}, outside {start:#x}..{end:#x}",
                arg.walk_end
            )));
        }
        start = arg.walk_end;
    }
    Ok(Some(bits))
}

fn kernel_answer(pagemap: &File, addr: usize, pages: usize) -> io::Result<Vec<u64>> {
    if let Some(bits) = scan_regions(pagemap, addr, pages)? {
        return Ok(bits);
    }
    read_answer(pagemap, addr, pages)
}

/// [`kernel_answer`] from `mincore` and `pagemap` read entry by entry.
fn read_answer(pagemap: &File, addr: usize, pages: usize) -> io::Result<Vec<u64>> {
    let mut bits = vec![0u64; pages.div_ceil(64)];
    // Resident pages.
    let mut vec = vec![0u8; pages];
    if pages > 0 {
        // SAFETY: mincore only reads the page tables of [addr, addr + pages * PAGE), which the
        // caller keeps mapped, and writes one byte per page into `vec`, which holds `pages`.
        let r = unsafe {
            libc::mincore(
                addr as *mut libc::c_void,
                pages * PAGE,
                vec.as_mut_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (i, v) in vec.iter().enumerate() {
        if may_hold_data(*v, 0) {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    // Present or swapped pages (a swapped-out anonymous page is not resident, and not zero).
    let mut buf = vec![0u8; PAGEMAP_BATCH.min(pages.max(1)) * 8];
    let first = addr / PAGE;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(PAGEMAP_BATCH);
        let chunk = &mut buf[..n * 8];
        pagemap.read_exact_at(chunk, ((first + done) * 8) as u64)?;
        for (k, e) in chunk.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if may_hold_data(0, e) {
                let i = done + k;
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        done += n;
    }
    Ok(bits)
}

/// Whether `data` is all zero: compared with a zero page, which the standard library does with
/// an optimised `memcmp` (wide loads, stops at the first difference; fast in debug builds too).
pub fn is_zero(data: &[u8]) -> bool {
    static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
    data.chunks(PAGE).all(|c| c == &ZERO_PAGE[..c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    struct Map {
        addr: usize,
        len: usize,
    }

    impl Map {
        fn new(len: usize, flags: i32, fd: i32) -> Self {
            // SAFETY: a fresh mapping chosen by the kernel; checked for failure below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            Self {
                addr: p as usize,
                len,
            }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is live for `self`'s lifetime and only this test uses it.
            unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    const ANON: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

    #[test]
    fn untouched_anonymous_pages_are_known_zero_written_ones_are_read() {
        let mut m = Map::new(256 * PAGE, ANON, -1);
        let r = scan(m.addr, m.len);
        assert_eq!(r.refused, None);
        assert_eq!(r.count(), 0, "nothing touched yet");
        let written = [0usize, 1, 63, 64, 100, 255];
        for &p in &written {
            m.bytes()[p * PAGE + 17] = p as u8 | 1;
        }
        let r = scan(m.addr, m.len);
        for p in 0..256 {
            assert_eq!(r.may_hold_data(p), written.contains(&p), "page {p}");
        }
        assert_eq!(r.run_end(2, 1000), 63);
        assert_eq!(r.run_end(64, 1000), 65);
        assert_eq!(r.run_end(101, 1000), 255);
        assert_eq!(r.run_end(101, 10), 111);
    }

    /// Where the kernel has `PAGEMAP_SCAN`, its regions give the same pages as reading
    /// `pagemap` and `mincore` (written pages, a page only read, which maps the zero page, huge
    /// runs and single pages); where it has not, the test says so and checks the fallback.
    #[test]
    fn the_region_scan_and_the_page_by_page_read_agree() {
        let pages = 4096 + 37;
        let mut m = Map::new(pages * PAGE, ANON, -1);
        for p in (0..pages).filter(|p| p % 97 == 5 || (1000..1600).contains(p) || *p == pages - 1) {
            m.bytes()[p * PAGE + p % PAGE] = 1;
        }
        // Read, not written: present (the shared zero page) in both answers.
        let read = std::hint::black_box(m.bytes()[3000 * PAGE]);
        assert_eq!(read, 0);
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let by_pages = read_answer(&pagemap, m.addr, pages).unwrap();
        match scan_regions(&pagemap, m.addr, pages).unwrap() {
            Some(by_regions) => assert!(by_regions == by_pages, "the two answers differ"),
            None => println!("this kernel has no PAGEMAP_SCAN: pagemap is read page by page"),
        }
        let r = Residency {
            bits: by_pages,
            pages,
            refused: None,
        };
        assert!(r.may_hold_data(5) && r.may_hold_data(1599) && r.may_hold_data(pages - 1));
        assert!(!r.may_hold_data(4) && !r.may_hold_data(1600));
        assert_eq!(kernel_answer(&pagemap, m.addr, pages).unwrap(), r.bits);
    }

    #[test]
    fn a_private_file_mapping_is_never_skipped() {
        // A restored VM's memory: MAP_PRIVATE of a file whose untouched pages read the file.
        let mut f = tempfile();
        let content = vec![0xa5u8; 16 * PAGE];
        f.write_all(&content).unwrap();
        let mut m = Map::new(
            16 * PAGE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            f.as_raw_fd(),
        );
        let r = scan(m.addr, m.len);
        assert!(r.refused.as_deref().unwrap().contains("backed by"), "{r:?}");
        assert_eq!(r.count(), 16);
        assert!(m.bytes().iter().all(|b| *b == 0xa5), "the file's content");
    }

    #[test]
    fn shared_memory_is_never_skipped() {
        let m = Map::new(
            8 * PAGE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        );
        let r = scan(m.addr, m.len);
        assert!(r.refused.as_deref().unwrap().contains("shared"), "{r:?}");
        assert_eq!(r.count(), 8);
    }

    #[test]
    fn a_range_not_wholly_mapped_is_refused() {
        let m = Map::new(8 * PAGE, ANON, -1);
        // SAFETY: unmaps the middle of this test's own mapping.
        unsafe { libc::munmap((m.addr + 2 * PAGE) as *mut libc::c_void, PAGE) };
        let r = scan(m.addr, m.len);
        assert!(
            r.refused.as_deref().unwrap().contains("not mapped"),
            "{r:?}"
        );
        assert_eq!(r.count(), 8);
    }

    #[test]
    fn maps_parsing() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 \n\
3000-5000 rw-p 00000000 00:00 0\n\
5000-6000 rw-s 00000000 00:05 123 /memfd:x (deleted)\n\
6000-7000 rw-p 00001000 08:01 42 /snap/memory.bin\n";
        assert_eq!(
            backing_from_maps(maps, 0x1000, 0x4000),
            Backing::AnonymousPrivate
        );
        assert!(
            matches!(backing_from_maps(maps, 0x2000, 0x4000), Backing::Other(w) if w.contains("shared"))
        );
        assert!(
            matches!(backing_from_maps(maps, 0x6000, 0x1000), Backing::Other(w) if w.contains("memory.bin"))
        );
        assert!(
            matches!(backing_from_maps(maps, 0x0, 0x2000), Backing::Other(w) if w.contains("not mapped"))
        );
        assert!(
            matches!(backing_from_maps(maps, 0x7000, 0x1000), Backing::Other(w) if w.contains("not mapped"))
        );
    }

    #[test]
    fn swapped_present_or_resident_pages_may_hold_data() {
        assert!(!may_hold_data(0, 0), "never populated");
        assert!(may_hold_data(0, PM_SWAPPED), "swapped out: not zero");
        assert!(
            may_hold_data(0, PM_SWAPPED | 0x1234),
            "swap entry with its offset"
        );
        assert!(may_hold_data(0, PM_PRESENT | 0x55), "present");
        assert!(may_hold_data(1, 0), "resident per mincore");
        // Other pagemap bits (soft-dirty 55, exclusive 56, file/shared 61) alone say nothing.
        assert!(!may_hold_data(0, (1 << 55) | (1 << 56) | (1 << 61)));
        assert!(!may_hold_data(0xfe, 0), "only mincore's low bit is defined");
    }

    #[test]
    fn all_marks_exactly_the_pages() {
        let r = Residency::all(70, "why");
        assert_eq!(r.count(), 70);
        assert!(r.may_hold_data(69));
        assert_eq!(r.run_end(0, 1000), 70);
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 2 * PAGE + 3];
        assert!(is_zero(&p));
        for i in [0, 63, 64, PAGE - 1, PAGE, 2 * PAGE + 2] {
            p[i] = 1;
            assert!(!is_zero(&p), "{i}");
            p[i] = 0;
        }
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "hourglass-residency-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
