/*
 * /init of the nested Linux clock tests (tests/tests/nested_linux_clock.rs): the guest's own view
 * of its clocks, read in a tight loop and reported on the console when the host asks.
 *
 * Freestanding (no libc): built by tests/build.rs with the host's C compiler as a static
 * executable of a few KiB, so the guest's initramfs is this file alone.
 *
 * It mounts sysfs, puts the console in raw mode, says HG-PROBE-READY, then loops: each pass
 * reads CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME (clock_gettime, which reads the
 * clocksource the kernel uses) and the TSC, and keeps the STEPS largest MONOTONIC steps between
 * two consecutive passes since the last mark, the mark's own reading included: across a pause,
 * a restore or a migration one of them is the outage (the largest under `wallclock`; under
 * `frozen` the outage is as short as the guest's clock ran, and scheduling hiccups around it
 * can be longer, so the host asks for them all and picks the step whose TSCs straddle the
 * freeze and the thaw `vm.info` reports).
 * An outage can fall between two reads of one pass, so a step runs from the pass before that
 * pair to the pass after it: every clock's step then holds the whole outage (and three passes
 * more). Between passes it polls the console for one-byte commands:
 *
 *   M  mark: one byte 0x06 (ACK) at once, so the host can bracket the reading with its own
 *      clock as closely as the console allows, then "HG-T <n> <realtime>", then
 *      "HG-MARK <n> <sample> GAP <sample> <sample>" (this reading, then the largest step's
 *      two readings), and a new window begins
 *   P  the steps the last mark's window kept, one "HG-STEP <sample> <sample>" line each, then
 *      "HG-STEPS-END <count>"
 *   S  TSC synchronisation: 400 reads alternating between CPU 0 and CPU 1 (sched_setaffinity),
 *      "HG-TSCSYNC <reads> <backwards> <largest backwards step in cycles>"
 *   C  "HG-CS <current clocksource>"
 *   W  start a writer (once): a child process on CPU 1 that writes one byte into each page of
 *      a 4 MiB buffer, pass after pass, 10 ms apart, for good (what a migration "while the
 *      guest writes memory" must keep re-sending); "HG-WRITER <pid>"
 * A <sample> is "<rt> <mono> <boot> <tsc> <tsc_end>": the three clocks, then the TSC read just
 * before and just after them. All numbers are decimal, nanoseconds or cycles.
 */

typedef unsigned long u64;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_poll 7
#define SYS_nanosleep 35
#define SYS_fork 57
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
    u64 rt, mono, boot, tsc, tsc_end;
};

static void take(struct sample *s)
{
    s->tsc = rdtsc();
    s->rt = clock_ns(0);   /* CLOCK_REALTIME */
    s->mono = clock_ns(1); /* CLOCK_MONOTONIC */
    s->boot = clock_ns(7); /* CLOCK_BOOTTIME */
    /* The TSC again: the clocks were read between the two (microseconds apart, unless the
     * vCPU lost its CPU in between, as it can on a host with one CPU). */
    s->tsc_end = rdtsc();
}

/* One output line, written at once. */
static char line[1024];
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
    put(" ");
    put_u64(s->tsc_end);
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

/* The writer's buffer: 4 MiB of bss, its pages the child's own once it writes them. */
#define WRITER_BYTES (4ul << 20)
static unsigned char writer_buf[WRITER_BYTES];
static i64 writer_pid;

static void writer(void)
{
    if (!writer_pid) {
        writer_pid = sys3(SYS_fork, 0, 0, 0);
        if (writer_pid == 0) {
            struct {
                i64 sec, nsec;
            } pause = {0, 10000000};
            unsigned char pass = 0;
            pin(2);
            for (;;) {
                u64 off;
                pass++;
                for (off = 0; off < WRITER_BYTES; off += 4096)
                    ((volatile unsigned char *)writer_buf)[off] = pass;
                sys3(SYS_nanosleep, &pause, 0, 0);
            }
        }
    }
    put("HG-WRITER ");
    put_u64((u64)writer_pid);
    flush();
}

/* The steps a window keeps, and what it keeps of each; and those of the last closed window. */
#define STEPS 16
static struct sample step_a[STEPS], step_b[STEPS];
static u64 step_len[STEPS];
static int step_pending[STEPS];
static struct sample last_a[STEPS], last_b[STEPS];
static u64 last_len[STEPS];

/* A new window starting at `s`. */
static void window_reset(const struct sample *s)
{
    int k;
    for (k = 0; k < STEPS; k++) {
        step_a[k] = step_b[k] = *s;
        step_len[k] = 0;
        step_pending[k] = 0;
    }
}

/* A new window from a reading taken now. */
static void window_restart(struct sample *prev, struct sample *prev2)
{
    take(prev);
    *prev2 = *prev;
    window_reset(prev);
}

/* `cur` is the pass after `prev` (and `prev2` the one before it): a slot waiting for the
 * pass after its step takes `cur`; then, if prev -> cur is longer than the shortest kept step,
 * it replaces that one, waiting for the next pass for its end. Returns whether a slot waits. */
static int window_note(const struct sample *prev2, const struct sample *prev,
                       const struct sample *cur)
{
    int k, m = 0, waiting = 0;
    u64 len = cur->mono - prev->mono;
    for (k = 0; k < STEPS; k++) {
        if (step_pending[k]) {
            step_b[k] = *cur;
            step_pending[k] = 0;
        }
        if (step_len[k] < step_len[m])
            m = k;
    }
    if (len > step_len[m]) {
        step_len[m] = len;
        step_a[m] = *prev2;
        step_b[m] = *cur;
        step_pending[m] = 1;
        waiting = 1;
    }
    return waiting;
}

void probe_main(void)
{
    struct sample prev2, prev, cur;
    u64 seq = 0;
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
    window_restart(&prev, &prev2);
    for (;;) {
        struct {
            int fd;
            short events, revents;
        } p = {0, 1 /* POLLIN */, 0};
        take(&cur);
        window_note(&prev2, &prev, &cur);
        prev2 = prev;
        prev = cur;
        if (sys3(SYS_poll, &p, 1, 0) > 0) {
            char cmd[16];
            i64 n = sys3(SYS_read, 0, cmd, sizeof cmd), i;
            for (i = 0; i < n; i++) {
                if (cmd[i] == 'M') {
                    struct sample now, after;
                    static const char ack = 6;
                    int k;
                    take(&now);
                    sys3(SYS_write, 1, &ack, 1);
                    /* The mark's own reading is a pass too: an outage that fell between the
                     * last pass and this command is a step of this window. */
                    if (window_note(&prev2, &prev, &now)) {
                        take(&after);
                        window_note(&prev, &now, &after);
                    }
                    {
                        int big = 0;
                        for (k = 0; k < STEPS; k++) {
                            last_a[k] = step_a[k];
                            last_b[k] = step_b[k];
                            last_len[k] = step_len[k];
                            if (step_len[k] > step_len[big])
                                big = k;
                        }
                        /* The new window begins before the report is written: the host pauses
                         * once it has read the report, maybe while this pass still writes
                         * it, and that step must land in the new window. */
                        window_restart(&prev, &prev2);
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
                        put_sample(&last_a[big]);
                        put_sample(&last_b[big]);
                        flush();
                    }
                } else if (cmd[i] == 'P') {
                    u64 count = 0;
                    int k;
                    for (k = 0; k < STEPS; k++) {
                        if (!last_len[k])
                            continue;
                        count++;
                        put("HG-STEP");
                        put_sample(&last_a[k]);
                        put_sample(&last_b[k]);
                        flush();
                    }
                    put("HG-STEPS-END ");
                    put_u64(count);
                    flush();
                    /* A new window: the report took time that is not a step of the clocks. */
                    window_restart(&prev, &prev2);
                } else if (cmd[i] == 'S' || cmd[i] == 'C' || cmd[i] == 'W') {
                    if (cmd[i] == 'S')
                        tsc_sync();
                    else if (cmd[i] == 'C')
                        clocksource();
                    else
                        writer();
                    /* A new window: what the report took is not a step of the guest's clocks. */
                    window_restart(&prev, &prev2);
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
