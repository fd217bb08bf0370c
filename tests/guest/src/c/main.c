/* Hourglass test guest: the sampling loop, run by every vCPU in long mode.
 * Freestanding C: no libc, no SSE (-mgeneral-regs-only), interrupts off. */
#include "protocol.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef long long s64;

#define COM1 0x3f8
#define MSR_TSC_ADJUST 0x3b
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)

/* Local APIC, for idle mode's timer. */
#define MSR_APIC_BASE 0x1b
#define MSR_TSC_DEADLINE 0x6e0
#define APIC_BASE_EXTD (1u << 10)
#define APIC_BASE_EN (1u << 11)
#define APIC_EOI 0xb0
#define APIC_SVR 0xf0
#define APIC_LVTT 0x320
#define APIC_TMICT 0x380
#define APIC_TDCR 0x3e0
#define APIC_SVR_ENABLE 0x100
#define APIC_SPURIOUS_VECTOR 0xff
#define APIC_LVTT_TSC_DEADLINE (2u << 17)
#define APIC_TDCR_DIV1 0xb
#define IDLE_TIMER_VECTOR 0xef
#define CPUID1_ECX_X2APIC (1u << 21)
#define CPUID1_ECX_TSC_DEADLINE (1u << 24)

struct pvclock {
	volatile u32 version;
	u32 pad0;
	volatile u64 tsc_timestamp;
	volatile u64 system_time;
	volatile u32 tsc_to_system_mul;
	volatile s8 tsc_shift;
	volatile u8 flags;
	u8 pad[2];
} __attribute__((packed, aligned(64)));

/* One per vCPU, each in its own cache lines. */
struct vcpu_state {
	volatile u64 rec[RECORD_WORDS];
} __attribute__((aligned(256)));

static struct pvclock pvclocks[MAX_VCPUS];
static struct vcpu_state vcpus[MAX_VCPUS];
static volatile u64 latest_tsc;   /* largest (TSC - bias) published by any vCPU */
static volatile u32 halted_count;

/* Shared configuration written by vCPU 0 before it sets config_ready. */
static u32 cfg_vcpus;
static u32 cfg_dirty_mib;
static u32 cfg_dirty_passes;   /* passes over the dirtied region, then stop (0 = forever) */
static u32 cfg_has_probe;
static volatile u32 config_ready;

/* Idle mode: one IDT shared by every vCPU; vectors 32..255 return at once (entry.S). */
struct idt_gate {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off1;
	u32 off2;
	u32 zero;
} __attribute__((packed));
static struct idt_gate idt[256] __attribute__((aligned(16)));
extern void guest_isr(void);
extern char exc_stubs[];
extern void idle_halt(void);

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

/* RDTSC ordered after every earlier load (mfence; lfence; rdtsc). */
static inline u64 rdtsc_ordered(void)
{
	u32 lo, hi;
	__asm__ volatile("mfence; lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((u64)hi << 32) | lo;
}

/* (a * b) / c for a quotient that fits in 64 bits; saturates otherwise. */
static u64 muldiv(u64 a, u64 b, u64 c)
{
	unsigned __int128 p = (unsigned __int128)a * b;
	u64 hi = (u64)(p >> 64), lo = (u64)p, q, r;
	if (c == 0 || hi >= c)
		return ~0ULL;
	__asm__("divq %4" : "=a"(q), "=d"(r) : "a"(lo), "d"(hi), "rm"(c));
	(void)r;
	return q;
}

static u64 pvclock_scale_delta(u64 delta, u32 mul, s8 shift)
{
	if (shift < 0)
		delta >>= -shift;
	else
		delta <<= shift;
	return (u64)(((unsigned __int128)delta * mul) >> 32);
}

/* ---- serial (COM1) ---- */
static void serial_putc(char c)
{
	for (int i = 0; i < 100000; i++)
		if (inb(COM1 + 5) & 0x20)
			break;
	outb(COM1, (u8)c);
}

static void puts_(const char *s)
{
	while (*s) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s++);
	}
}

static void put_u64(u64 v)
{
	char buf[24];
	int i = 23;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(&buf[i]);
}

static void put_hex(u64 v)
{
	static const char digits[] = "0123456789abcdef";
	puts_("0x");
	for (int s = 60; s >= 0; s -= 4)
		serial_putc(digits[(v >> s) & 0xf]);
}

/* Serial output is shared by every vCPU; a simple spin lock keeps lines whole. */
static volatile u32 serial_lock;
static void lock_serial(void)
{
	while (__atomic_exchange_n(&serial_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
}
static void unlock_serial(void) { __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE); }

/* Called by the exception stubs (entry.S) with the frame: vector, error code, rip, cs, rflags,
 * rsp, ss. Prints it without taking the serial lock (the fault may have come while holding it)
 * and halts this vCPU for good. */
void guest_exception(const u64 *f) __attribute__((noreturn));
void guest_exception(const u64 *f)
{
	puts_("hourglass-guest: EXCEPTION vector=");
	put_u64(f[0]);
	puts_(" error=");
	put_hex(f[1]);
	puts_(" rip=");
	put_hex(f[2]);
	puts_(" rsp=");
	put_hex(f[5]);
	puts_(" rflags=");
	put_hex(f[4]);
	puts_("\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- per-vCPU sampling ---- */
struct sampler {
	u32 idx;
	int kvmclock;        /* pvclock enabled */
	int has_adjust;      /* IA32_TSC_ADJUST exists */
	u64 tsc_khz;
	u64 flags;
	u64 bias;            /* sum of TSC_ADJUST deltas that moved the TSC */
	u64 sim_skew;        /* self-test: cycles subtracted from every TSC read */
	int have_prev;
	int prev_ns_valid;   /* the previous sample had a filled pvclock page */
	u64 prev_tsc;        /* raw TSC of the previous sample */
	u64 prev_ns;         /* kvmclock of the previous sample */
	u64 last_adjust;
	u64 cmd_seq_done;
	u32 idle_us;         /* idle mode: halt this long between samples (0 = busy loop) */
	int apic;            /* 0 = not set up yet, 1 = xAPIC (MMIO), 2 = x2APIC (MSRs) */
	int tsc_deadline;    /* the APIC timer runs in TSC-deadline mode */
	u64 apic_mmio;
};

static inline volatile u64 *rec(u32 idx) { return vcpus[idx].rec; }

/* Reads TSC and kvmclock from one consistent pvclock snapshot; returns 0
 * when there is no kvmclock value (disabled, or the page not yet filled). */
static int read_clocks(struct sampler *s, u64 *tsc, u64 *ns)
{
	struct pvclock *p = &pvclocks[s->idx];
	if (!s->kvmclock) {
		*tsc = rdtsc_ordered();
		*ns = 0;
		return 0;
	}
	for (;;) {
		u32 v = p->version;
		__asm__ volatile("" ::: "memory");
		u64 ts = p->tsc_timestamp, st = p->system_time;
		u32 mul = p->tsc_to_system_mul;
		s8 shift = p->tsc_shift;
		u64 t = rdtsc_ordered();
		__asm__ volatile("" ::: "memory");
		if ((v & 1) || v != p->version)
			continue;
		*tsc = t;
		*ns = st + pvclock_scale_delta(t - ts, mul, shift);
		return v != 0;
	}
}

static void maybe_worst(u32 idx, int word, u64 v)
{
	if (v > rec(idx)[word])
		rec(idx)[word] = v;
}

static void sample(struct sampler *s)
{
	volatile u64 *r = rec(s->idx);
	u64 published = __atomic_load_n(&latest_tsc, __ATOMIC_ACQUIRE);
	u64 tsc, ns;
	int ns_valid = read_clocks(s, &tsc, &ns);
	tsc -= s->sim_skew;
	u64 adj = s->has_adjust ? rdmsr(MSR_TSC_ADJUST) : 0;
	u64 vt = tsc - s->bias;      /* the VM TSC as this vCPU sees it */

	/* Cross-vCPU order: a value published before this read began must not be ahead. */
	if (published > vt) {
		r[REC_CROSS_VCPU]++;
		maybe_worst(s->idx, REC_CROSS_VCPU_WORST, published - vt);
	}
	u64 cur = published;
	while (cur < vt &&
	       !__atomic_compare_exchange_n(&latest_tsc, &cur, vt, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		;

	if (s->have_prev) {
		u64 pvt = s->prev_tsc;
		if (tsc < pvt) {
			r[REC_TSC_BACKWARDS]++;
			maybe_worst(s->idx, REC_TSC_BACKWARDS_WORST, pvt - tsc);
		} else if (s->tsc_khz) {
			u64 dtsc = tsc - pvt;
			u64 dns = muldiv(dtsc, 1000000, s->tsc_khz);
			maybe_worst(s->idx, REC_MAX_JUMP_NS, dns);
			if (ns_valid && s->prev_ns_valid) {
				s64 dk = (s64)(ns - s->prev_ns);
				s64 diff = dk - (s64)dns;
				u64 mag = diff < 0 ? (u64)0 - (u64)diff : (u64)diff;
				if (mag > KVMCLOCK_BOUND_NS) {
					r[REC_KVMCLOCK_MISMATCH]++;
					maybe_worst(s->idx, REC_KVMCLOCK_MISMATCH_WORST_NS, mag);
				}
			}
		}
	}
	s->have_prev = 1;
	s->prev_tsc = tsc;
	s->prev_ns = ns;
	s->prev_ns_valid = ns_valid;
	s->last_adjust = adj;
	r[REC_SAMPLES]++;
	r[REC_LAST_TSC] = tsc;
	r[REC_LAST_KVMCLOCK_NS] = ns;
	r[REC_LAST_TSC_ADJUST] = adj;
}

/* Writes IA32_TSC_ADJUST and learns whether the write moved the TSC. */
static void set_tsc_adjust(struct sampler *s, u64 value)
{
	volatile u64 *r = rec(s->idx);
	if (!s->has_adjust)
		return;
	u64 old = rdmsr(MSR_TSC_ADJUST);
	u64 t1 = rdtsc_ordered();
	wrmsr(MSR_TSC_ADJUST, value);
	u64 t2 = rdtsc_ordered();
	u64 delta = value - old;
	u64 moved = t2 - t1;
	/* Architecturally the TSC moves by delta; some hosts only store the value. */
	s64 err_if_moved = (s64)(moved - delta);
	u64 a = err_if_moved < 0 ? (u64)0 - (u64)err_if_moved : (u64)err_if_moved;
	if (delta != 0 && a < moved) {
		s->bias += delta;
		s->flags |= FLAG_ADJUST_MOVES_TSC;
	}
	r[REC_ADJUST_WRITES]++;
	r[REC_TSC_BIAS] = s->bias;
	s->have_prev = 0; /* the next sample starts a new baseline */
}

/* ---- idle mode ---- */
static void idt_build(void)
{
	for (int v = 0; v < 256; v++) {
		/* Exceptions to their stubs (entry.S), every other vector to guest_isr. */
		u64 isr = v < 32 ? (u64)(unsigned long)(exc_stubs + 16 * v)
				 : (u64)(unsigned long)guest_isr;
		idt[v].off0 = (u16)isr;
		idt[v].sel = 0x08;
		idt[v].ist = 0;
		idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].off1 = (u16)(isr >> 16);
		idt[v].off2 = (u32)(isr >> 32);
		idt[v].zero = 0;
	}
}

static void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(idt) - 1, (u64)(unsigned long)idt };
	__asm__ volatile("lidt %0" : : "m"(d) : "memory");
}

static void apic_write(struct sampler *s, u32 reg, u32 v)
{
	if (s->apic == 2)
		wrmsr(0x800 + (reg >> 4), v);
	else
		*(volatile u32 *)(unsigned long)(s->apic_mmio + reg) = v;
}

/* Enables this vCPU's local APIC with its timer on IDLE_TIMER_VECTOR, masked until armed. */
static void apic_setup(struct sampler *s)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & APIC_BASE_EN)) {
		base |= APIC_BASE_EN;
		wrmsr(MSR_APIC_BASE, base);
	}
	if (c & CPUID1_ECX_X2APIC) {
		if (!(base & APIC_BASE_EXTD))
			wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD);
		s->apic = 2;
	} else {
		s->apic_mmio = base & 0xfffff000ULL; /* below 4 GiB: identity mapped */
		s->apic = 1;
	}
	s->tsc_deadline = (c & CPUID1_ECX_TSC_DEADLINE) != 0 && s->tsc_khz != 0;
	apic_write(s, APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
	if (s->tsc_deadline) {
		apic_write(s, APIC_LVTT, IDLE_TIMER_VECTOR | APIC_LVTT_TSC_DEADLINE);
	} else {
		apic_write(s, APIC_TDCR, APIC_TDCR_DIV1);
		apic_write(s, APIC_LVTT, IDLE_TIMER_VECTOR); /* one-shot */
	}
}

/* Halts until the APIC timer fires idle_us from now (or another interrupt arrives). The
 * host's pause kicks the vCPU out of the halt and back into it; time spent paused counts. */
static void idle_wait(struct sampler *s)
{
	if (!s->apic)
		apic_setup(s);
	if (s->tsc_deadline) {
		wrmsr(MSR_TSC_DEADLINE, rdtsc_ordered() + (u64)s->idle_us * s->tsc_khz / 1000);
	} else {
		/* KVM's APIC bus runs at 1 GHz unless the VMM says otherwise: 1 count = 1 ns. */
		apic_write(s, APIC_TMICT, s->idle_us * 1000u);
	}
	idle_halt();
	apic_write(s, APIC_EOI, 0);
}

static u32 read_idle_us(void)
{
	u32 v = inl(PROBE_BASE + PROBE_REG_IDLE_US);
	return v > IDLE_MAX_US ? IDLE_MAX_US : v;
}

/* Publishes this vCPU's record; returns the command the device left in it. */
static u64 report(struct sampler *s, u64 *arg)
{
	volatile u64 *r = rec(s->idx);
	r[REC_FLAGS] = s->flags;
	r[REC_TSC_KHZ] = s->tsc_khz;
	r[REC_SEQ]++;
	r[REC_CMD] = CMD_NONE;
	__asm__ volatile("mfence" ::: "memory");
	if (!cfg_has_probe)
		return CMD_NONE;
	outl(PROBE_BASE + PROBE_REG_DOORBELL, (u32)(unsigned long)r);
	__asm__ volatile("" ::: "memory");
	s->idle_us = read_idle_us();
	u64 cmd = r[REC_CMD];
	if (cmd == CMD_NONE || r[REC_CMD_SEQ] == s->cmd_seq_done)
		return CMD_NONE;
	s->cmd_seq_done = r[REC_CMD_SEQ];
	*arg = r[REC_CMD_ARG];
	return cmd;
}

static void totals(u64 *samples, u64 *back, u64 *cross, u64 *kvm)
{
	*samples = *back = *cross = *kvm = 0;
	for (u32 i = 0; i < cfg_vcpus; i++) {
		*samples += rec(i)[REC_SAMPLES];
		*back += rec(i)[REC_TSC_BACKWARDS];
		*cross += rec(i)[REC_CROSS_VCPU];
		*kvm += rec(i)[REC_KVMCLOCK_MISMATCH];
	}
}

static void heartbeat(struct sampler *s, u64 n)
{
	u64 samples, back, cross, kvm;
	totals(&samples, &back, &cross, &kvm);
	volatile u64 *r = rec(s->idx);
	lock_serial();
	puts_("hourglass-guest: heartbeat ");
	put_u64(n);
	puts_(" samples=");
	put_u64(samples);
	puts_(" viol=");
	put_u64(back);
	serial_putc('/');
	put_u64(cross);
	serial_putc('/');
	put_u64(kvm);
	if (!cfg_has_probe) {
		/* No probe device: print the findings here instead. */
		puts_(" tsc=");
		put_u64(r[REC_LAST_TSC]);
		puts_(" kvmclock_ns=");
		put_u64(r[REC_LAST_KVMCLOCK_NS]);
		puts_(" tsc_adjust=");
		put_hex(r[REC_LAST_TSC_ADJUST]);
		puts_(" max_jump_ns=");
		put_u64(r[REC_MAX_JUMP_NS]);
		puts_(" tsc_khz=");
		put_u64(s->tsc_khz);
		puts_(" kvmclock_worst_ns=");
		put_u64(r[REC_KVMCLOCK_MISMATCH_WORST_NS]);
	}
	puts_("\n");
	unlock_serial();
}

static u32 kvm_base(void)
{
	u32 a, b, c, d;
	for (u32 base = 0x40000000; base < 0x40010000; base += 0x100) {
		cpuid(base, 0, &a, &b, &c, &d);
		/* "KVMKVMKVM\0\0\0" */
		if (b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d)
			return base;
	}
	return 0;
}

/* Dirties the next 64 pages; stops at the end of pass `passes` (0 = never). */
static void dirty_step(u64 *cursor, u64 *pass, u64 pages, u64 passes, volatile u64 *r)
{
	/* 64 pages per sample keeps samples frequent while the region cycles. */
	for (int i = 0; i < 64; i++) {
		if (passes && *pass >= passes)
			return;
		volatile u8 *p = (volatile u8 *)(unsigned long)(DIRTY_BASE + (*cursor << 12));
		*p = (u8)(*pass + 1);
		if (++*cursor >= pages) {
			*cursor = 0;
			++*pass;
			r[REC_DIRTY_PASSES] = *pass;
		}
	}
}

void guest_main(u32 idx, u32 start_info)
{
	struct sampler s;
	memset(&s, 0, sizeof(s));
	s.idx = idx;
	(void)start_info;

	if (idx == 0) {
		u32 id = inl(PROBE_BASE + PROBE_REG_ID);
		cfg_has_probe = id == PROBE_MAGIC;
		if (cfg_has_probe) {
			cfg_vcpus = inl(PROBE_BASE + PROBE_REG_VCPUS);
			if (cfg_vcpus == 0 || cfg_vcpus > MAX_VCPUS)
				cfg_vcpus = cfg_vcpus ? MAX_VCPUS : 1;
			cfg_dirty_mib = inl(PROBE_BASE + PROBE_REG_DIRTY_MIB);
			cfg_dirty_passes = inl(PROBE_BASE + PROBE_REG_DIRTY_PASSES);
		} else {
			cfg_vcpus = 1;
		}
		lock_serial();
		puts_("hourglass-guest: banner vcpus=");
		put_u64(cfg_vcpus);
		puts_(" probe=");
		puts_(cfg_has_probe ? "yes" : "no");
		puts_(" dirty_mib=");
		put_u64(cfg_dirty_mib);
		puts_(" dirty_passes=");
		put_u64(cfg_dirty_passes);
		puts_("\n");
		unlock_serial();
		idt_build();
		__atomic_store_n(&config_ready, 1, __ATOMIC_RELEASE);
	} else {
		while (!__atomic_load_n(&config_ready, __ATOMIC_ACQUIRE))
			cpu_relax();
	}
	if (idx >= cfg_vcpus) {
		for (;;)
			__asm__ volatile("cli; hlt");
	}

	idt_load();
	volatile u64 *r = rec(idx);
	r[REC_MAGIC] = RECORD_MAGIC;
	r[REC_VCPU] = idx;

	u32 a, b, c, d;
	cpuid(0, 0, &a, &b, &c, &d);
	if (a >= 7) {
		cpuid(7, 0, &a, &b, &c, &d);
		s.has_adjust = (b >> 1) & 1;
	}
	if (s.has_adjust)
		s.flags |= FLAG_TSC_ADJUST;

	u32 base = kvm_base();
	if (base) {
		u32 max;
		cpuid(base, 0, &max, &b, &c, &d);
		cpuid(base + 1, 0, &a, &b, &c, &d);
		if (a & KVM_FEATURE_CLOCKSOURCE2) {
			wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)(unsigned long)&pvclocks[idx] | 1);
			s.kvmclock = 1;
			s.flags |= FLAG_KVMCLOCK;
		}
		if (max >= base + 0x10) {
			cpuid(base + 0x10, 0, &a, &b, &c, &d);
			if (a) {
				s.tsc_khz = a;
				s.flags |= FLAG_KHZ_CPUID;
			}
		}
	}
	if (!s.tsc_khz && cfg_has_probe) {
		s.tsc_khz = inl(PROBE_BASE + PROBE_REG_TSC_KHZ);
		if (s.tsc_khz)
			s.flags |= FLAG_KHZ_PROBE;
	}
	if (!s.tsc_khz && s.kvmclock) {
		/* Wait for the host to fill the page, then invert mul/shift. */
		struct pvclock *p = &pvclocks[idx];
		for (int i = 0; i < 1000000 && p->tsc_to_system_mul == 0; i++)
			cpu_relax();
		u32 mul = p->tsc_to_system_mul;
		s8 shift = p->tsc_shift;
		if (mul) {
			u64 khz = ((u64)1000000 << 32) / mul;
			s.tsc_khz = shift >= 0 ? khz >> shift : khz << -shift;
			s.flags |= FLAG_KHZ_PVCLOCK;
		}
	}

	if (cfg_has_probe)
		s.idle_us = read_idle_us();

	u64 report_cycles = s.tsc_khz ? s.tsc_khz * REPORT_INTERVAL_US / 1000 : 10000000;
	u64 beat_cycles = s.tsc_khz ? s.tsc_khz * 1000 : 2000000000ULL;
	u64 dirty_pages = (u64)cfg_dirty_mib << 8, cursor = 0, pass = 0;
	u64 beats = 0;

	sample(&s);
	u64 next_report = r[REC_LAST_TSC];
	u64 last_beat_tsc = r[REC_LAST_TSC], last_beat_ns = r[REC_LAST_KVMCLOCK_NS];
	if (idx == 0)
		heartbeat(&s, beats++);

	for (;;) {
		sample(&s);
		u64 now = r[REC_LAST_TSC];
		if (idx == 0 && dirty_pages && (!cfg_dirty_passes || pass < cfg_dirty_passes))
			dirty_step(&cursor, &pass, dirty_pages, cfg_dirty_passes, r);
		if (idx == 0) {
			int due = s.kvmclock ? r[REC_LAST_KVMCLOCK_NS] - last_beat_ns >= 1000000000ULL
					     : now - last_beat_tsc >= beat_cycles;
			if (due) {
				last_beat_ns = r[REC_LAST_KVMCLOCK_NS];
				last_beat_tsc = now;
				heartbeat(&s, beats++);
			}
		}
		if ((s64)(now - next_report) >= 0 || now < next_report - report_cycles) {
			u64 arg = 0, cmd;
			next_report = now + report_cycles;
			cmd = report(&s, &arg);
			if (cmd == CMD_SET_TSC_ADJUST) {
				set_tsc_adjust(&s, arg);
			} else if (cmd == CMD_SIMULATE_SKEW) {
				s.sim_skew = arg;
				r[REC_SIM_SKEW] = arg;
			} else if (cmd == CMD_HALT) {
				s.flags |= FLAG_HALTING;
				report(&s, &arg);
				__atomic_add_fetch(&halted_count, 1, __ATOMIC_ACQ_REL);
				for (;;)
					__asm__ volatile("cli; hlt");
			}
		}
		if (s.idle_us)
			idle_wait(&s);
	}
}
