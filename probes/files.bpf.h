/* Kernel-only helpers of proc.bpf.c: which opened file is watched, judged at the open's
 * exit by the file behind the returned fd (its inode, its directory's inode and its
 * name, or its directory's name and its name), and the event for it. Included by
 * proc.bpf.c after its maps and proc.bpf.h. */
#ifndef SWARM_FILES_BPF_H
#define SWARM_FILES_BPF_H

/* Which watch the file matches: by its identity, by its directory's identity and its name,
 * or by its directory's name and its name. Runs at every open's exit: every read here is
 * a helper call, so few of them. */
static __always_inline struct path_rule *match_file(struct work *w, struct file *f,
						    __u32 *how)
{
	struct dentry *d = BPF_CORE_READ(f, f_path.dentry);
	struct dentry *dir = BPF_CORE_READ(d, d_parent);
	const __u8 *name;
	struct path_rule *r;
	__u32 len, zero = 0;
	__u64 *lens;
	long n;

	inode_id(BPF_CORE_READ(f, f_inode), &w->dir.dir);
	r = bpf_map_lookup_elem(&watched_files, &w->dir.dir);
	if (r) {
		*how = MATCH_FILE;
		return r;
	}
	/* d_parent never leaves the superblock: the directory's dev is the file's */
	w->dir.dir.ino = BPF_CORE_READ(dir, d_inode, i_ino);
	name = BPF_CORE_READ(d, d_name.name);
	if (bpf_map_lookup_elem(&watched_dir_ids, &w->dir.dir)) {
		__builtin_memset(w->dir.name, 0, sizeof(w->dir.name));
		n = bpf_probe_read_kernel_str(w->dir.name, sizeof(w->dir.name), name);
		if (n <= 1)
			return NULL;
		w->dir.prefixlen = (4 + sizeof(w->dir.dir) + n - 1) * 8;	/* pad0, dir, name */
		r = bpf_map_lookup_elem(&watched_dirs, &w->dir);
		if (r && (!(r->flags & PATH_EXACT) || r->len == n - 1)) {
			*how = MATCH_DIR;
			return r;
		}
	}
	/* "*\/dir/name" patterns: only names of a length one of them has */
	lens = bpf_map_lookup_elem(&watched_name_lens, &zero);
	if (!lens || !*lens)
		return NULL;
	len = BPF_CORE_READ(d, d_name.len);
	if (len >= NAME_LEN || !(*lens & (1ULL << (len & (NAME_LEN - 1)))))
		return NULL;
	__builtin_memset(&w->names, 0, sizeof(w->names));
	bpf_probe_read_kernel_str(w->names.name, sizeof(w->names.name), name);
	bpf_probe_read_kernel_str(w->names.dir, sizeof(w->names.dir),
				  BPF_CORE_READ(dir, d_name.name));
	*how = MATCH_NAME;
	return bpf_map_lookup_elem(&watched_names, &w->names);
}

#ifndef S_IFCHR
#define S_IFCHR 0020000
#endif

/* An open of a GPU character device (major proc_cfg.gpu_major): a gpu_open_event, by the
 * device number (a container's /dev/nvidia0 is its own node, with its own inode). 1 when
 * the file was such a device (reported, or the report lost and counted). */
static __always_inline int gpu_device_open(struct task_struct *task, struct file *f,
					   __u16 syscall)
{
	struct inode *inode = BPF_CORE_READ(f, f_inode);
	struct gpu_open_event *e;
	__u32 rdev;

	if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFCHR)
		return 0;
	rdev = BPF_CORE_READ(inode, i_rdev);
	if ((rdev >> 20) != proc_cfg.gpu_major)		/* the kernel's dev_t: MAJOR << 20 */
		return 0;
	e = reserve(sizeof(*e), EVENT_GPU_OPEN);
	if (!e)
		return 1;
	fill_proc_ancestry(&e->proc, task);
	e->start_ns = BPF_CORE_READ(task, group_leader, start_boottime);
	e->major = rdev >> 20;
	e->minor = rdev & 0xfffff;
	e->flags = BPF_CORE_READ(f, f_flags);
	e->syscall = syscall;
	bpf_ringbuf_submit(e, 0);
	return 1;
}

static __always_inline int check_open(long fd, __u16 syscall)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file_open_event *e;
	struct file **fds, *f = NULL;
	struct fdtable *fdt;
	struct path_rule *r;
	struct work *w;
	__u32 fmode, how = 0, n;

	if (fd < 0 || is_agent() || !owned())
		return 0;
	w = work();
	if (!w)
		return 0;
	fdt = BPF_CORE_READ(task, files, fdt);
	if (fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_core_read(&f, sizeof(f), &fds[fd]);
	if (!f)
		return 0;
	if (proc_cfg.gpu_major && gpu_device_open(task, f, syscall))
		return 0;
	r = match_file(w, f, &how);
	if (!r)
		return 0;
	fmode = BPF_CORE_READ(f, f_mode);
	if (!(fmode & (FMODE_WRITE | FMODE_CREATED)) && !(r->flags & PATH_READS))
		return 0;
	if ((r->flags & PATH_CREATIONS) && !(fmode & FMODE_CREATED))
		return 0;
	e = reserve(sizeof(*e), EVENT_FILE_OPEN);
	if (!e)
		return 0;
	fill_proc_ancestry(&e->proc, task);
	e->flags = BPF_CORE_READ(f, f_flags);
	e->fmode = fmode;
	e->rule_id = r->id;
	e->rule_flags = r->flags;
	e->syscall = syscall;
	e->match = how;
	inode_id(BPF_CORE_READ(f, f_inode), &e->file);
	inode_id(BPF_CORE_READ(f, f_path.dentry, d_parent, d_inode), &e->dir);
	n = walk_path(BPF_CORE_READ(f, f_path.dentry), BPF_CORE_READ(f, f_path.mnt), w->path,
		      &e->path_flags);
	e->path_len = n;
	copy_walked(e->path, w->path, n);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

#endif /* SWARM_FILES_BPF_H */
