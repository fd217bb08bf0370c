/* Hourglass test guest: PVH entry, shared by every vCPU.
 *
 * Entry state (PVH): flat 32-bit protected mode, paging off, interrupts off,
 * EBX = start_info physical address (may be 0). Each vCPU takes its index from
 * its initial APIC ID (CPUID 1, EBX[31:24]). vCPU 0 clears .bss, builds
 * identity page tables (2 MiB pages, 0..4 GiB) and releases the others; every
 * vCPU then enables PAE + long mode + paging, switches to its own stack and
 * calls guest_main(index, start_info). No stack is used before that. */
#include "protocol.h"

#define STACK_SIZE 16384

	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4                 /* namesz: "Xen\0" */
	.long 4                 /* descsz */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start32
	.balign 4
	/* Hourglass note type 1: start every vCPU at the PVH entry at once (each picks its
	 * role from its APIC ID below). Without it Hourglass starts only vCPU 0 there, as a
	 * kernel that brings up its own CPUs expects. */
	.long 10                /* namesz: "Hourglass\0" */
	.long 4                 /* descsz */
	.long 1                 /* all vCPUs at the entry */
	.asciz "Hourglass"
	.balign 4
	.long 1
	.balign 4
	.popsection

	.section .text.entry, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl %ebx, %esi                 /* start_info */
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	movl %ebx, %edi                 /* vCPU index */
	cmpl $MAX_VCPUS, %edi
	jae park32
	testl %edi, %edi
	jnz wait_release

	/* vCPU 0: clear .bss. */
	movl $__bss_start, %edx
	movl $__bss_end, %ecx
	subl %edx, %ecx
	shrl $2, %ecx
	movl %edi, %ebp                 /* no stack yet: keep the index in EBP */
	movl %edx, %edi
	xorl %eax, %eax
	rep stosl
	movl %ebp, %edi
	/* pml4[0] -> pdpt; pdpt[i] -> pd + i*4096 (i < 4); pd: 2048 x 2 MiB. */
	movl $pdpt, %eax
	orl $3, %eax
	movl %eax, pml4
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $12, %eax
	addl $pd, %eax
	orl $3, %eax
	movl %eax, pdpt(,%ecx,8)
	incl %ecx
	cmpl $4, %ecx
	jb 1b
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax                 /* present, writable, 2 MiB */
	movl %eax, pd(,%ecx,8)
	incl %ecx
	cmpl $2048, %ecx
	jb 2b
	movl %esi, boot_start_info
	movl $1, release_flag
	jmp enter_long

wait_release:
	pause
	cmpl $1, release_flag
	jne wait_release

enter_long:
	lgdt gdt_desc
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx          /* EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG | PE */
	movl %eax, %cr0
	ljmp $0x08, $long_entry

park32:
	cli
	hlt
	jmp park32

	.code64
long_entry:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl %edi, %edi                 /* zero-extend index */
	movl %esi, %esi                 /* zero-extend start_info */
	movq %rdi, %rax
	incq %rax
	shlq $14, %rax                  /* (index + 1) * STACK_SIZE */
	leaq stacks(%rax), %rsp
	xorl %ebp, %ebp
	call guest_main
3:	cli
	hlt
	jmp 3b

	/* Idle mode (see main.c): every external interrupt vector points at guest_isr, which
	 * only returns; the C code that halted sends the EOI. Interrupts are enabled only in
	 * idle_halt's sti; hlt window (sti's shadow covers hlt, so a timer that already fired
	 * wakes the hlt at once), and guest_isr's frame lands below idle_halt's return address. */
	.text
	.globl guest_isr
guest_isr:
	iretq

	/* CPU exceptions (vectors 0..31): a 16-byte stub each, at exc_stubs + 16 * vector, that
	 * pushes a dummy error code where the CPU pushes none, then the vector, and calls
	 * guest_exception (main.c) with the frame: vector, error, rip, cs, rflags, rsp, ss. It
	 * prints what happened on the serial port and halts this vCPU: a guest fault is reported,
	 * not turned into a triple fault that looks like a shutdown. */
	.balign 16
	.globl exc_stubs
exc_stubs:
	.irp v,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.balign 16
	.if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq $0
	.endif
	pushq $\v
	jmp exc_common
	.endr
exc_common:
	movq %rsp, %rdi
	andq $-16, %rsp
	call guest_exception
4:	cli
	hlt
	jmp 4b

	.globl idle_halt
idle_halt:
	sti
	hlt
	cli
	ret

	.section .rodata
	.balign 8
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_end:
	.balign 8
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.data
	.balign 4
	.globl release_flag
release_flag:
	.long 0
	.globl boot_start_info
boot_start_info:
	.long 0

	.bss
	.balign 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
	.balign 16
stacks:	.skip MAX_VCPUS * STACK_SIZE
