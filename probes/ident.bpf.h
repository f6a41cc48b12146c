/* Kernel-only helpers of proc.bpf.c: identities the kernel knows and a process cannot set.
 * An executable is mm->exe_file's inode (its superblock's dev_t and inode number), a file
 * is the inode behind an fd, and a path is what walking the dentries up to the root gives
 * (bpf_d_path needs fentry/LSM, refused on the hosts this runs on). Included by
 * proc.bpf.c after its maps. */
#ifndef SWARM_IDENT_BPF_H
#define SWARM_IDENT_BPF_H

#define WALK_DEPTH 40		/* dentries and mount crossings walked per path */

static __always_inline void inode_id(struct inode *inode, struct file_id *id)
{
	id->ino = BPF_CORE_READ(inode, i_ino);
	id->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	id->pad0 = 0;
}

/* What `task` runs: zero for kernel threads (no mm). */
static __always_inline void exe_id(struct task_struct *task, struct file_id *id)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);

	id->ino = 0;
	id->dev = 0;
	id->pad0 = 0;
	if (exe)
		inode_id(BPF_CORE_READ(exe, f_inode), id);
}

/* activity.bpf.c wants the identities and the walk only (it has no watched_exes). */
#ifndef IDENT_NO_ANCESTRY
static __always_inline __u32 exe_flags(struct file_id *id)
{
	__u32 *flags;

	if (!id->ino)
		return 0;
	flags = bpf_map_lookup_elem(&watched_exes, id);
	return flags ? *flags : 0;
}

/* The executables of real_parent, its real_parent, ... (ANCESTORS levels at most, up to
 * pid 1); returns the watched_exes flags of all of them ORed. A double fork reparents a
 * process to init or a subreaper: that is what cgroups are for (service_cgroups). */
static __always_inline __u32 fill_ancestry(struct proc_ctx *p, struct task_struct *task)
{
	struct task_struct *t = BPF_CORE_READ(task, real_parent);
	__u32 flags = 0, i;

	for (i = 0; i < ANCESTORS; i++) {
		if (!t || BPF_CORE_READ(t, tgid) == 0)
			break;
		exe_id(t, &p->ancestors[i]);
		flags |= exe_flags(&p->ancestors[i]);
		p->ancestor_count = i + 1;
		if (BPF_CORE_READ(t, tgid) == 1)
			break;
		t = BPF_CORE_READ(t, real_parent);
	}
	return flags;
}
#endif /* IDENT_NO_ANCESTRY */

/* Walks from `d` (on mount `vmnt`) to the root, crossing mounts (struct mount's
 * mnt_parent and mnt_mountpoint, as Tetragon and Tracee do), and writes the components
 * leaf first, each NUL terminated, into buf (2 * PATH_LEN bytes: a read at any offset
 * below PATH_LEN fits). Returns the bytes used (at most PATH_LEN) and sets *flags to
 * WALK_COMPLETE, or WALK_TRUNCATED when the path was too deep or too long. The root is
 * that of the task's mount namespace: a container's /usr/bin/dpkg reads /usr/bin/dpkg,
 * which is why exemptions compare (dev, ino), never this path alone. */
static __always_inline __u32 walk_path(struct dentry *d, struct vfsmount *vmnt, __u8 *buf,
				       __u16 *flags)
{
	__u64 mnt_off = bpf_core_field_offset(struct mount, mnt);
	struct mount *mnt = (void *)vmnt - mnt_off;
	struct dentry *parent, *root;
	struct mount *up;
	const __u8 *name;
	__u32 off = 0, i;
	long n;

	*flags = WALK_TRUNCATED;
	for (i = 0; i < WALK_DEPTH; i++) {
		root = BPF_CORE_READ(vmnt, mnt_root);
		parent = BPF_CORE_READ(d, d_parent);
		if (d == root) {
			up = BPF_CORE_READ(mnt, mnt_parent);
			if (!up || up == mnt) {
				*flags = WALK_COMPLETE;
				break;
			}
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			vmnt = (void *)up + mnt_off;
			continue;
		}
		if (!parent || d == parent) {	/* the root of a filesystem not mounted here */
			*flags = WALK_COMPLETE;
			break;
		}
		if (off >= PATH_LEN)
			return PATH_LEN;	/* too long: stays WALK_TRUNCATED */
		name = BPF_CORE_READ(d, d_name.name);
		n = bpf_probe_read_kernel_str(&buf[off & (PATH_LEN - 1)], PATH_LEN, name);
		if (n <= 0)
			return off;
		off += n;
		d = parent;
	}
	if (off > PATH_LEN) {
		*flags = WALK_TRUNCATED;
		return PATH_LEN;
	}
	return off;
}

/* Copies the `n` bytes a walk_path() wrote (at most PATH_LEN) from the scratch buffer to
 * `dst`, an already zeroed event field. Only those bytes: the buffer is per-CPU and
 * reused, so past them lie the tails of earlier, longer paths of other processes, which
 * must not travel to user space (it would read another process's path, whatever the
 * length field says). */
static __always_inline void copy_walked(__u8 *dst, const __u8 *buf, __u32 n)
{
	if (n > PATH_LEN)
		n = PATH_LEN;
	if (n)
		bpf_probe_read_kernel(dst, n, buf);
}

#endif /* SWARM_IDENT_BPF_H */
