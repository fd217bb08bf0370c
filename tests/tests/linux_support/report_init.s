    .text
    .globl _start
_start:
    lea sysfs(%rip),%rdi        # mount("sysfs", "/sys", "sysfs", 0, 0)
    lea sys(%rip),%rsi
    mov %rdi,%rdx
    xor %r10d,%r10d
    xor %r8d,%r8d
    mov $165,%eax
    syscall
    mov $1,%edi                 # write(1, msg, 21)
    lea msg(%rip),%rsi
    mov $21,%edx
    mov $1,%eax
    syscall
    sub $64,%rsp                # clock_gettime(CLOCK_REALTIME, sp)
    xor %edi,%edi
    mov %rsp,%rsi
    mov $228,%eax
    syscall
    mov (%rsp),%rax             # seconds -> decimal, backwards from sp+63 ("\n" there)
    lea 63(%rsp),%rsi
    movb $10,(%rsi)
    mov $10,%ecx
1:  xor %edx,%edx
    div %rcx
    add $48,%dl
    dec %rsi
    mov %dl,(%rsi)
    test %rax,%rax
    jnz 1b
    sub $15,%rsi                # the label before the digits
    mov $15,%ecx
    lea date(%rip),%rdi
2:  mov (%rdi),%al
    mov %al,(%rsi)
    inc %rdi
    inc %rsi
    loop 2b
    sub $15,%rsi
    lea 64(%rsp),%rdx           # write(1, label+digits+"\n", end - start)
    sub %rsi,%rdx
    mov $1,%edi
    mov $1,%eax
    syscall
    add $64,%rsp
    lea online(%rip),%rdi
    lea lonline(%rip),%rsi
    call cat
    lea csrc(%rip),%rdi
    lea lcsrc(%rip),%rsi
    call cat
    mov $1,%edi                 # ioctl(1, TCSBRK, 1): tcdrain
    mov $0x5409,%esi
    mov $1,%edx
    mov $16,%eax
    syscall
    mov $0xfee1dead,%edi        # reboot(MAGIC1, MAGIC2, CMD)
    mov $672274793,%esi
cmd:
    mov $0x4321fedc,%edx        # LINUX_REBOOT_CMD_POWER_OFF (RESTART: 0x01234567)
    mov $169,%eax
    syscall
    mov $7,%edi                 # reboot failed: exit(7)
    mov $60,%eax
    syscall
cat:                            # write label (22 bytes) at rsi, then the file at rdi
    push %rdi
    mov %rsi,%rsi
    mov $1,%edi
    mov $22,%edx
    mov $1,%eax
    syscall
    pop %rdi
    xor %esi,%esi               # open(path, O_RDONLY)
    mov $2,%eax
    syscall
    test %eax,%eax
    js 3f
    sub $256,%rsp
    mov %eax,%edi               # read(fd, sp, 256)
    mov %rsp,%rsi
    mov $256,%edx
    xor %eax,%eax
    syscall
    test %eax,%eax
    jle 4f
    mov %eax,%edx               # write(1, sp, n)
    mov %rsp,%rsi
    mov $1,%edi
    mov $1,%eax
    syscall
4:  add $256,%rsp
3:  ret
sysfs:   .asciz "sysfs"
sys:     .asciz "/sys"
online:  .asciz "/sys/devices/system/cpu/online"
csrc:    .asciz "/sys/devices/system/clocksource/clocksource0/current_clocksource"
msg:     .ascii "HOURGLASS-LINUX-INIT\n"
date:    .ascii "HOURGLASS-DATE "
lonline: .ascii "HOURGLASS-CPUS-ONLINE "
lcsrc:   .ascii "HOURGLASS-CLOCKSOURCE "
