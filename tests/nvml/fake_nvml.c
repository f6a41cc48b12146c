/* A stand-in libnvidia-ml.so.1 for machines without an NVIDIA GPU: the NVML functions
 * agent/sources/gpu.py calls (through the real, vendored pynvml binding), answering from
 * a state file the test writes and may rewrite at any time (FAKE_NVML_STATE; re-read on
 * every call, so a test scripts devices, processes, counters, events and failures live).
 *
 * State file, one directive a line ('#' comments), key=value tokens:
 *   driver 550.54.15
 *   gpu index=0 uuid=GPU-0 name=NVIDIA_H200 util=37 memutil=12 total=N used=N temp=41
 *       power=mW sm=MHz mem=MHz reasons=BITS dbe=N unsupported=power,temp,ecc,clocks,util
 *       (underscores in name= are spaces)
 *   proc gpu=0 pid=1234 mem=BYTES graphics=0|1 util=SM%   (util: its per-process
 *       utilisation sample, nvmlDeviceGetProcessUtilization; "procutil" in the GPU's
 *       unsupported= list: that call answers Not Supported)
 *   event gpu=0 id=1 type=8 data=79     (each id is delivered once per event set;
 *                                        type 8 = XID critical error, data = the XID)
 *   fail CODE                           (every call but nvmlShutdown/nvmlErrorString)
 *   init_fail CODE                      (nvmlInit* only: 9 = driver not loaded)
 * Build: gcc -shared -fPIC -O2 -o libnvidia-ml.so.1 fake_nvml.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_GPUS 16
#define MAX_PROCS 256
#define MAX_EVENTS 1024

enum { OK = 0, E_UNINIT = 1, E_INVALID = 2, E_UNSUPPORTED = 3, E_NOT_FOUND = 6,
       E_INSUFFICIENT = 7, E_TIMEOUT = 10 };

struct gpu { unsigned index; char uuid[96], name[96]; unsigned util, memutil, temp, power,
             sm, mem; unsigned long long total, used, reasons, dbe; char unsupported[128]; };
struct proc { unsigned gpu, pid, graphics, util; unsigned long long mem; };
struct event { unsigned gpu; unsigned long long id, type, data; };
struct state { char driver[80]; int fail, init_fail, ngpus, nprocs, nevents;
               struct gpu gpus[MAX_GPUS]; struct proc procs[MAX_PROCS];
               struct event events[MAX_EVENTS]; };
struct evset { unsigned long long mask[MAX_GPUS]; unsigned long long seen[MAX_EVENTS];
               int nseen; };
typedef struct { void *device; unsigned long long type, data; unsigned gi, ci; } event_data;
typedef struct { unsigned pid; unsigned long long mem; unsigned gi, ci; } proc_info;

static struct state S;
static int initialised;

static unsigned long long num(const char *v) { return strtoull(v, NULL, 0); }

static void load(void)
{
    memset(&S, 0, sizeof S);
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) { S.init_fail = 9; return; }    /* no script: "driver not loaded" */
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *save = NULL, *word = strtok_r(line, " \t\r\n", &save);
        if (!word || word[0] == '#') continue;
        if (!strcmp(word, "driver")) {
            char *v = strtok_r(NULL, " \t\r\n", &save);
            if (v) snprintf(S.driver, sizeof S.driver, "%s", v);
            continue;
        }
        if (!strcmp(word, "fail") || !strcmp(word, "init_fail")) {
            char *v = strtok_r(NULL, " \t\r\n", &save);
            *(word[0] == 'f' ? &S.fail : &S.init_fail) = v ? (int)num(v) : 999;
            continue;
        }
        struct gpu *g = NULL; struct proc *p = NULL; struct event *e = NULL;
        if (!strcmp(word, "gpu") && S.ngpus < MAX_GPUS) {
            g = &S.gpus[S.ngpus]; g->index = S.ngpus++;
        } else if (!strcmp(word, "proc") && S.nprocs < MAX_PROCS) {
            p = &S.procs[S.nprocs++];
        } else if (!strcmp(word, "event") && S.nevents < MAX_EVENTS) {
            e = &S.events[S.nevents++];
        } else continue;
        for (char *kv; (kv = strtok_r(NULL, " \t\r\n", &save)); ) {
            char *v = strchr(kv, '=');
            if (!v) continue;
            *v++ = 0;
            if (g) {
                if (!strcmp(kv, "uuid")) snprintf(g->uuid, sizeof g->uuid, "%s", v);
                else if (!strcmp(kv, "name")) {
                    snprintf(g->name, sizeof g->name, "%s", v);
                    for (char *c = g->name; *c; c++) if (*c == '_') *c = ' ';
                }
                else if (!strcmp(kv, "unsupported"))
                    snprintf(g->unsupported, sizeof g->unsupported, ",%s,", v);
                else if (!strcmp(kv, "util")) g->util = num(v);
                else if (!strcmp(kv, "memutil")) g->memutil = num(v);
                else if (!strcmp(kv, "temp")) g->temp = num(v);
                else if (!strcmp(kv, "power")) g->power = num(v);
                else if (!strcmp(kv, "sm")) g->sm = num(v);
                else if (!strcmp(kv, "mem")) g->mem = num(v);
                else if (!strcmp(kv, "total")) g->total = num(v);
                else if (!strcmp(kv, "used")) g->used = num(v);
                else if (!strcmp(kv, "reasons")) g->reasons = num(v);
                else if (!strcmp(kv, "dbe")) g->dbe = num(v);
            } else if (p) {
                if (!strcmp(kv, "gpu")) p->gpu = num(v);
                else if (!strcmp(kv, "pid")) p->pid = num(v);
                else if (!strcmp(kv, "mem")) p->mem = num(v);
                else if (!strcmp(kv, "graphics")) p->graphics = num(v);
                else if (!strcmp(kv, "util")) p->util = num(v);
            } else {
                if (!strcmp(kv, "gpu")) e->gpu = num(v);
                else if (!strcmp(kv, "id")) e->id = num(v);
                else if (!strcmp(kv, "type")) e->type = num(v);
                else if (!strcmp(kv, "data")) e->data = num(v);
            }
        }
    }
    fclose(f);
}

/* Every call: re-read the script; a scripted failure or a missing init answers first. */
#define ENTER() do { load(); if (S.fail) return S.fail; if (!initialised) return E_UNINIT; } while (0)

static struct gpu *dev(void *handle)
{
    uintptr_t i = (uintptr_t)handle;
    if (i < 0x1000 || i - 0x1000 >= (uintptr_t)S.ngpus) return NULL;
    return &S.gpus[i - 0x1000];
}

static int unsupported(struct gpu *g, const char *what)
{
    char key[40];
    snprintf(key, sizeof key, ",%s,", what);
    return strstr(g->unsupported, key) != NULL;
}

#define DEVICE(g, h) struct gpu *g; ENTER(); if (!(g = dev(h))) return E_INVALID
#define COUNTER(g, what) if (unsupported(g, what)) return E_UNSUPPORTED

int nvmlInitWithFlags(unsigned flags)
{
    (void)flags;
    load();
    if (S.init_fail) return S.init_fail;
    if (S.fail) return S.fail;
    initialised = 1;
    return OK;
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlInit(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { initialised = 0; return OK; }

const char *nvmlErrorString(int r)
{
    switch (r) {
    case OK: return "Success";
    case E_UNINIT: return "Uninitialized";
    case E_UNSUPPORTED: return "Not Supported";
    case 9: return "Driver Not Loaded";
    case E_TIMEOUT: return "Timeout";
    case 15: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *buf, unsigned len)
{
    ENTER();
    snprintf(buf, len, "%s", S.driver[0] ? S.driver : "0.0-fake");
    return OK;
}

int nvmlDeviceGetCount_v2(unsigned *n) { ENTER(); *n = S.ngpus; return OK; }

int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h)
{
    ENTER();
    if (i >= (unsigned)S.ngpus) return E_INVALID;
    *h = (void *)(uintptr_t)(0x1000 + i);
    return OK;
}

int nvmlDeviceGetName(void *h, char *buf, unsigned len)
{ DEVICE(g, h); snprintf(buf, len, "%s", g->name); return OK; }
int nvmlDeviceGetUUID(void *h, char *buf, unsigned len)
{ DEVICE(g, h); snprintf(buf, len, "%s", g->uuid); return OK; }
int nvmlDeviceGetIndex(void *h, unsigned *i) { DEVICE(g, h); *i = g->index; return OK; }
int nvmlDeviceGetMinorNumber(void *h, unsigned *i) { DEVICE(g, h); *i = g->index; return OK; }

int nvmlDeviceGetUtilizationRates(void *h, unsigned *u)
{ DEVICE(g, h); COUNTER(g, "util"); u[0] = g->util; u[1] = g->memutil; return OK; }

int nvmlDeviceGetMemoryInfo(void *h, unsigned long long *m)
{
    DEVICE(g, h); COUNTER(g, "memory");
    m[0] = g->total; m[1] = g->total > g->used ? g->total - g->used : 0; m[2] = g->used;
    return OK;
}

int nvmlDeviceGetTemperature(void *h, int sensor, unsigned *t)
{ DEVICE(g, h); COUNTER(g, "temp"); if (sensor) return E_INVALID; *t = g->temp; return OK; }
int nvmlDeviceGetPowerUsage(void *h, unsigned *mw)
{ DEVICE(g, h); COUNTER(g, "power"); *mw = g->power; return OK; }

int nvmlDeviceGetClockInfo(void *h, int type, unsigned *mhz)
{
    DEVICE(g, h); COUNTER(g, "clocks");
    if (type == 1) *mhz = g->sm; else if (type == 2) *mhz = g->mem; else return E_INVALID;
    return OK;
}

int nvmlDeviceGetCurrentClocksEventReasons(void *h, unsigned long long *r)
{ DEVICE(g, h); COUNTER(g, "reasons"); *r = g->reasons; return OK; }
int nvmlDeviceGetCurrentClocksThrottleReasons(void *h, unsigned long long *r)
{ return nvmlDeviceGetCurrentClocksEventReasons(h, r); }

int nvmlDeviceGetTotalEccErrors(void *h, int type, int counter, unsigned long long *n)
{
    DEVICE(g, h); COUNTER(g, "ecc");
    *n = (type == 1 && counter == 0) ? g->dbe : 0;   /* uncorrected, volatile */
    return OK;
}

static int processes(void *h, unsigned *count, proc_info *out, unsigned graphics)
{
    DEVICE(g, h);
    unsigned n = 0;
    for (int i = 0; i < S.nprocs; i++)
        if (S.procs[i].gpu == g->index && S.procs[i].graphics == graphics) n++;
    if (!out || *count < n) { *count = n; return n ? E_INSUFFICIENT : OK; }
    n = 0;
    for (int i = 0; i < S.nprocs; i++)
        if (S.procs[i].gpu == g->index && S.procs[i].graphics == graphics) {
            out[n].pid = S.procs[i].pid; out[n].mem = S.procs[i].mem;
            out[n].gi = out[n].ci = 0xFFFFFFFF; n++;
        }
    *count = n;
    return OK;
}
int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned *c, proc_info *p)
{ return processes(h, c, p, 0); }
int nvmlDeviceGetComputeRunningProcesses_v2(void *h, unsigned *c, proc_info *p)
{ return processes(h, c, p, 0); }
int nvmlDeviceGetGraphicsRunningProcesses_v3(void *h, unsigned *c, proc_info *p)
{ return processes(h, c, p, 1); }
int nvmlDeviceGetGraphicsRunningProcesses_v2(void *h, unsigned *c, proc_info *p)
{ return processes(h, c, p, 1); }

/* One sample per process of the GPU, stamped now (microseconds), when newer than
 * lastSeen: what the real call answers between two of its own samples is NOT_FOUND. */
typedef struct { unsigned pid; unsigned long long ts; unsigned sm, mem, enc, dec; } util_sample;

int nvmlDeviceGetProcessUtilization(void *h, util_sample *out, unsigned *count,
                                    unsigned long long last_seen)
{
    DEVICE(g, h); COUNTER(g, "procutil");
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    unsigned long long now = t.tv_sec * 1000000ULL + t.tv_nsec / 1000;
    unsigned n = 0;
    for (int i = 0; i < S.nprocs; i++)
        if (S.procs[i].gpu == g->index) n++;
    if (!n || last_seen >= now) return E_NOT_FOUND;
    if (!out || *count < n) { *count = n; return E_INSUFFICIENT; }
    n = 0;
    for (int i = 0; i < S.nprocs; i++)
        if (S.procs[i].gpu == g->index) {
            out[n] = (util_sample){S.procs[i].pid, now, S.procs[i].util, 0, 0, 0};
            n++;
        }
    *count = n;
    return OK;
}

int nvmlDeviceGetSupportedEventTypes(void *h, unsigned long long *types)
{ DEVICE(g, h); *types = 0x2 | 0x8; return OK; }   /* double-bit ECC, XID */

int nvmlEventSetCreate(struct evset **set)
{
    ENTER();
    *set = calloc(1, sizeof **set);
    return *set ? OK : 20;
}

int nvmlDeviceRegisterEvents(void *h, unsigned long long types, struct evset *set)
{ DEVICE(g, h); if (!set) return E_INVALID; set->mask[g->index] |= types; return OK; }

static int delivered(struct evset *set, unsigned long long id)
{
    for (int i = 0; i < set->nseen; i++) if (set->seen[i] == id) return 1;
    return 0;
}

int nvmlEventSetWait_v2(struct evset *set, event_data *data, unsigned timeout_ms)
{
    struct timespec start, now, pause = {0, 10 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        ENTER();
        if (!set) return E_INVALID;
        for (int i = 0; i < S.nevents; i++) {
            struct event *e = &S.events[i];
            if (e->gpu >= MAX_GPUS || !(set->mask[e->gpu] & e->type) || delivered(set, e->id))
                continue;
            if (set->nseen < MAX_EVENTS) set->seen[set->nseen++] = e->id;
            data->device = (void *)(uintptr_t)(0x1000 + e->gpu);
            data->type = e->type; data->data = e->data; data->gi = data->ci = 0xFFFFFFFF;
            return OK;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long ms = (now.tv_sec - start.tv_sec) * 1000LL + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms >= timeout_ms) return E_TIMEOUT;
        nanosleep(&pause, NULL);
    }
}

int nvmlEventSetFree(struct evset *set) { free(set); return OK; }
