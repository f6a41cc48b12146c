// SPDX-License-Identifier: GPL-2.0
/* One global of each shared struct so that all of events.h lands in this object's BTF;
 * tests/unit/test_abi.py compares that BTF with agent/sources/abi.py. Never loaded. */
#include "vmlinux.h"
#include "events.h"

struct event_header abi_event_header;
struct addr_key abi_addr_key;
struct service_key abi_service_key;
struct source_stats abi_source_stats;
struct service_stats abi_service_stats;
struct remote_stats abi_remote_stats;
struct net_thresholds abi_net_thresholds;
struct net_config abi_net_config;
struct net_source_event abi_net_source_event;
struct net_service_event abi_net_service_event;
struct tcp_remote_event abi_tcp_remote_event;
struct proc_config abi_proc_config;
struct file_id abi_file_id;
struct dir_key abi_dir_key;
struct name_key abi_name_key;
struct path_rule abi_path_rule;
struct proc_ctx abi_proc_ctx;
struct proc_exec_event abi_proc_exec_event;
struct proc_exit_event abi_proc_exit_event;
struct file_open_event abi_file_open_event;
struct module_load_event abi_module_load_event;
struct ptrace_event abi_ptrace_event;
struct bpf_prog_load_event abi_bpf_prog_load_event;
enum parse_failure abi_parse_failure;
struct stdio_fd abi_stdio_fd;
struct stdio_dup_event abi_stdio_dup_event;
struct proc_stdio_event abi_proc_stdio_event;
struct gpu_open_event abi_gpu_open_event;
struct activity_config abi_activity_config;
struct act_proc abi_act_proc;
struct flow_event abi_flow_event;
struct exec_new_event abi_exec_new_event;
struct flow_bytes_key abi_flow_bytes_key;
struct flow_bytes abi_flow_bytes;
struct cgroup_activity abi_cgroup_activity;
enum flow_outcome abi_flow_outcome;
enum activity_cap abi_activity_cap;
