/*
 * /init of the nested Linux clock tests (tests/tests/nested_linux_clock.rs): the guest's own view
 * of its clocks, read in a tight loop and reported on the console when the host asks.
 *
 * Freestanding (no libc): built by tests/build.rs with the host's C compiler as a static
 * executable of a few KiB, so the guest's initramfs is this file alone.
 *
 * It mounts sysfs, puts the console in raw mode, says HG-PROBE-READY, then loops: each pass
 * reads CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME (clock_gettime, which reads the
 * clocksource the kernel uses) and the TSC, and finds the largest MONOTONIC step between two
 * consecutive passes since the last mark: across a pause, a restore or a migration, that is
 * the outage. An outage can fall between two reads of one pass, so the step it reports runs
 * from the pass before that pair to the pass after it: every clock's step then holds the whole
 * outage (and three passes more). Between passes it polls the console for one-byte commands:
 *
 *   M  mark: one byte 0x06 (ACK) at once, so the host can bracket the reading with its own
 *      clock as closely as the console allows, then "HG-T <n> <realtime>", then
 *      "HG-MARK <n> <rt> <mono> <boot> <tsc> GAP <rt> <mono> <boot> <tsc> <rt> <mono> <boot>
 *      <tsc>" (this sample, then the largest step's two samples), and a new window begins
 *   S  TSC synchronisation: 400 reads alternating between CPU 0 and CPU 1 (sched_setaffinity),
 *      "HG-TSCSYNC <reads> <backwards> <largest backwards step in cycles>"
 *   C  "HG-CS <current clocksource>"
 * All numbers are decimal, nanoseconds or cycles.
 */

typedef unsigned long u64;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_poll 7
#define SYS_ioctl 16
#define SYS_exit 60
#define SYS_mount 165
#define SYS_sched_setaffinity 203
#define SYS_clock_gettime 228

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
    i64 r;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)

static u64 rdtsc(void)
{
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u64 clock_ns(int id)
{
    i64 ts[2];
    sys3(SYS_clock_gettime, id, ts, 0);
    return (u64)ts[0] * 1000000000ul + (u64)ts[1];
}

struct sample {
    u64 rt, mono, boot, tsc;
};

static void take(struct sample *s)
{
    s->tsc = rdtsc();
    s->rt = clock_ns(0);   /* CLOCK_REALTIME */
    s->mono = clock_ns(1); /* CLOCK_MONOTONIC */
    s->boot = clock_ns(7); /* CLOCK_BOOTTIME */
}

/* One output line, written at once. */
static char line[512];
static unsigned len;

static void put(const char *s)
{
    while (*s && len < sizeof line - 1)
        line[len++] = *s++;
}

static void put_u64(u64 v)
{
    char d[24];
    int n = 0;
    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && len < sizeof line - 1)
        line[len++] = d[--n];
}

static void put_sample(const struct sample *s)
{
    put(" ");
    put_u64(s->rt);
    put(" ");
    put_u64(s->mono);
    put(" ");
    put_u64(s->boot);
    put(" ");
    put_u64(s->tsc);
}

static void flush(void)
{
    unsigned off = 0;
    line[len++] = '\n';
    while (off < len) {
        i64 n = sys3(SYS_write, 1, line + off, len - off);
        if (n <= 0)
            break;
        off += (unsigned)n;
    }
    len = 0;
}

static void pin(u64 mask)
{
    sys3(SYS_sched_setaffinity, 0, sizeof mask, &mask);
}

static void tsc_sync(void)
{
    u64 last = 0, back = 0, worst = 0;
    int i;
    for (i = 0; i < 400; i++) {
        u64 t;
        pin(1ul << (i & 1));
        t = rdtsc();
        if (i && t < last) {
            back++;
            if (last - t > worst)
                worst = last - t;
        }
        last = t;
    }
    pin(~0ul);
    put("HG-TSCSYNC 400 ");
    put_u64(back);
    put(" ");
    put_u64(worst);
    flush();
}

static void clocksource(void)
{
    char buf[64];
    i64 fd = sys3(SYS_open, "/sys/devices/system/clocksource/clocksource0/current_clocksource", 0, 0);
    i64 n = fd < 0 ? -1 : sys3(SYS_read, fd, buf, sizeof buf - 1);
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    put("HG-CS ");
    if (n > 0) {
        buf[n] = 0;
        if (buf[n - 1] == '\n')
            buf[n - 1] = 0;
        put(buf);
    } else {
        put("unknown");
    }
    flush();
}

void probe_main(void)
{
    struct sample prev2, prev, cur, a, b;
    u64 gap = 0, seq = 0;
    int need_b = 0;
    unsigned char t[64];

    sys6(SYS_mount, (i64) "sysfs", (i64) "/sys", (i64) "sysfs", 0, 0, 0);
    /* struct termios: c_iflag, c_oflag, c_cflag, c_lflag, c_line, c_cc[19]. TCGETS, TCSETS. */
    if (sys3(SYS_ioctl, 0, 0x5401, t) == 0) {
        unsigned *lflag = (unsigned *)(t + 12);
        *lflag &= ~(0x2u | 0x8u); /* ICANON, ECHO */
        t[17 + 6] = 1;            /* VMIN */
        t[17 + 5] = 0;            /* VTIME */
        sys3(SYS_ioctl, 0, 0x5402, t);
    }
    put("HG-PROBE-READY");
    flush();
    take(&prev);
    prev2 = a = b = prev;
    for (;;) {
        struct {
            int fd;
            short events, revents;
        } p = {0, 1 /* POLLIN */, 0};
        take(&cur);
        if (need_b) {
            b = cur;
            need_b = 0;
        }
        if (cur.mono - prev.mono > gap) {
            gap = cur.mono - prev.mono;
            a = prev2;
            b = cur;
            need_b = 1;
        }
        prev2 = prev;
        prev = cur;
        if (sys3(SYS_poll, &p, 1, 0) > 0) {
            char cmd[16];
            i64 n = sys3(SYS_read, 0, cmd, sizeof cmd), i;
            for (i = 0; i < n; i++) {
                if (cmd[i] == 'M') {
                    struct sample now, sa, sb;
                    static const char ack = 6;
                    take(&now);
                    sys3(SYS_write, 1, &ack, 1);
                    if (need_b)
                        b = now;
                    /* The new window begins before the report is written: the host pauses
                     * once it has read the report, maybe while this pass still writes it, and
                     * that step must land in the new window. */
                    sa = a;
                    sb = b;
                    take(&prev);
                    prev2 = a = b = prev;
                    gap = 0;
                    need_b = 0;
                    seq++;
                    put("HG-T ");
                    put_u64(seq);
                    put(" ");
                    put_u64(now.rt);
                    flush();
                    put("HG-MARK ");
                    put_u64(seq);
                    put_sample(&now);
                    put(" GAP");
                    put_sample(&sa);
                    put_sample(&sb);
                    flush();
                } else if (cmd[i] == 'S' || cmd[i] == 'C') {
                    if (cmd[i] == 'S')
                        tsc_sync();
                    else
                        clocksource();
                    /* A new window: what the report took is not a step of the guest's clocks. */
                    take(&prev);
                    prev2 = a = b = prev;
                    gap = 0;
                    need_b = 0;
                }
            }
        }
    }
}

__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  xor %ebp, %ebp\n"
        "  and $-16, %rsp\n"
        "  call probe_main\n"
        "  mov $60, %eax\n"
        "  mov $7, %edi\n"
        "  syscall\n");
