/* A stand-in libcuda.so.1 for dry runs of bench/gpu_check.sh on machines without a GPU:
 * the driver API calls bench/gpu_hold.py makes. cuMemAlloc_v2 adds the calling process
 * to the stand-in NVML's state file (FAKE_NVML_STATE, fake_nvml.c), as the real driver
 * would list it. Build: gcc -shared -fPIC -o libcuda.so.1 fake_cuda.c */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int device;

int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDeviceGet(int *dev, int ordinal) { *dev = device = ordinal; return 0; }
int cuDevicePrimaryCtxRetain(void **ctx, int dev) { (void)dev; *ctx = (void *)0x1; return 0; }
int cuCtxSetCurrent(void *ctx) { (void)ctx; return 0; }
int cuCtxSynchronize(void) { return 0; }
int cuGetErrorString(int rc, const char **s) { (void)rc; *s = "fake"; return 0; }
int cuMemsetD8_v2(unsigned long long p, unsigned char v, size_t n)
{ (void)p; (void)v; (void)n; return 0; }

int cuMemAlloc_v2(unsigned long long *p, size_t n)
{
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return 2;     /* CUDA_ERROR_OUT_OF_MEMORY */
    fprintf(f, "proc gpu=%d pid=%d mem=%zu\n", device, (int)getpid(), n);
    fclose(f);
    *p = 0x10000;
    return 0;
}
