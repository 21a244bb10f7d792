/* Can this process really use Intel AMX tiles? cluster/install_llamacpp.sh asks before it lets
 * llama.cpp compile its AMX kernels (GGML_NATIVE would enable them wherever the CPU advertises AMX).
 *
 * Why a probe that executes the instructions: a VM can list amx_tile/amx_int8 in /proc/cpuinfo, grant
 * the kernel permission (arch_prctl succeeds) and still fault on the first LDTILECFG (seen on a 2-core
 * Intel Xeon VM: SIGSEGV in ggml_backend_amx_mul_mat, a general protection fault in the kernel log).
 * So the last check runs what llama.cpp's kernel runs first, in a child process, and reads how it died.
 *
 * Checks, in order; the first that fails is the verdict:
 *   1. CPUID leaf 7: AMX-TILE and AMX-INT8 (llama.cpp's AMX kernels are int8);
 *   2. OSXSAVE and XCR0 bits 17-18 (XTILECFG, XTILEDATA): the OS manages the tile state;
 *   3. arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux grants this process the tile data;
 *   4. in a forked child: LDTILECFG with llama.cpp's shape (palette 1, 16 rows x 64 bytes), TILEZERO,
 *      TDPBSSD, TILESTORED, TILERELEASE; the child must exit 0 with the expected dot products.
 *
 * Prints one line, `amx: usable` or `amx: unusable: <why>`; exit status 0 when usable, 1 when not.
 * MEMO_AMX_PROBE_FROM_CHECK=N starts at check N: the tests start at 4 to exercise the child's fault path
 * on any x86 CPU (on one without AMX the child dies on LDTILECFG, as on a VM that advertises tiles it
 * cannot run). Never set it in an install.
 *
 *   cc -O1 -o amx_probe cluster/amx_probe.c && ./amx_probe   (gcc >= 11 or clang >= 12 know the AMX intrinsics)
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* The intrinsics compile under a target attribute, so the probe itself needs no -mamx-* flags and the
 * rest of the program stays runnable on any x86-64 CPU. */
__attribute__((target("amx-tile,amx-int8"), noinline)) static int run_tiles(void) {
    static int8_t a[16][64], b[16][64];
    static int32_t c[16][16];
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 3; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    memset(a, 1, sizeof a);
    memset(b, 2, sizeof b);
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
    /* each C element sums 64 products of 1 x 2 */
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            if (c[i][j] != 128) return 3;
    return 0;
}

int main(void) {
    unsigned eax, ebx, ecx, edx;
    const char *from_env = getenv("MEMO_AMX_PROBE_FROM_CHECK");
    int from = from_env ? atoi(from_env) : 1;
    if (from <= 1 &&
        (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25)))) {
        puts("amx: unusable: the CPU does not advertise AMX-TILE and AMX-INT8 (CPUID leaf 7)");
        return 1;
    }
    if (from <= 2) {
        if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) {
            puts("amx: unusable: the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE is clear)");
            return 1;
        }
        uint32_t lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) != (3u << 17)) {
            printf("amx: unusable: XCR0=0x%x lacks the tile state (bits 17-18): the OS or hypervisor does not "
                   "manage it\n", lo);
            return 1;
        }
    }
    if (from <= 3 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        puts("amx: unusable: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) was refused by the kernel");
        return 1;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { puts("amx: unusable: fork failed"); return 1; }
    if (pid == 0) {
        /* the permission is per process: request it again in the child before the first tile instruction */
        syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
        _exit(run_tiles());
    }
    int status = 0;
    if (waitpid(pid, &status, 0) < 0) { puts("amx: unusable: waitpid failed"); return 1; }
    if (WIFSIGNALED(status)) {
        printf("amx: unusable: the tile instructions raised %s (the VM advertises AMX it cannot run)\n",
               strsignal(WTERMSIG(status)));
        return 1;
    }
    if (WEXITSTATUS(status) != 0) {
        puts("amx: unusable: the tile instructions ran but computed a wrong dot product");
        return 1;
    }
    puts("amx: usable");
    return 0;
}
