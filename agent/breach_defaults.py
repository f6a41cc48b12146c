"""Defaults of the config's `breach:` section (agent.config.Breach), kept apart from the
config loader: what the process probe watches and the breach rules compare against."""

# Executables by path (fnmatch globs allowed: "/usr/bin/python3*"), never by comm: the
# agent stat()s them on the host and the kernel matches the executable's (dev, ino), so a
# renamed process, a copy of the binary or a container's own /usr/bin/dpkg is none of
# them. Re-resolved every REFRESH_S (package upgrades replace binaries). Interpreted
# programs (gunicorn, uvicorn, dnf 4, unattended-upgrade) run as their interpreter: name
# their cgroups instead (service_cgroups). Paths are watch patterns: "/exact",
# "/prefix*", "/dir/", "*/dir/name".
SHELLS = ("/usr/bin/sh", "/usr/bin/bash", "/usr/bin/dash", "/usr/bin/zsh", "/usr/bin/ksh*",
          "/usr/bin/mksh", "/usr/bin/csh", "/usr/bin/tcsh", "/usr/bin/fish", "/usr/bin/ash",
          "/usr/bin/busybox", "/usr/bin/python[0-9]*", "/usr/local/bin/python[0-9]*",
          "/usr/bin/perl", "/usr/bin/perl5*", "/usr/bin/ruby*", "/usr/bin/php*",
          "/usr/bin/lua[0-9]*", "/usr/bin/node", "/usr/bin/nodejs", "/usr/bin/nc",
          "/usr/bin/nc.*", "/usr/bin/ncat", "/usr/bin/netcat", "/usr/bin/socat",
          "/usr/bin/telnet*")
SERVICES = ("/usr/sbin/nginx", "/usr/sbin/apache2", "/usr/sbin/httpd", "/usr/bin/caddy",
            "/usr/sbin/haproxy", "/usr/bin/envoy", "/usr/local/bin/envoy", "/usr/bin/traefik",
            "/usr/local/bin/traefik", "/usr/sbin/lighttpd",
            "/opt/tritonserver/bin/tritonserver", "/usr/bin/ollama", "/usr/local/bin/ollama",
            "/usr/bin/redis-server", "/usr/lib/postgresql/*/bin/postgres", "/usr/sbin/mysqld",
            "/usr/sbin/mariadbd", "/usr/bin/mongod", "/usr/bin/memcached")
# Service managers start services (their start of one is not a shell "spawned by the
# service") and put accepted sockets on a service's stdin/stdout (socket activation,
# inetd: their dup2 onto fd 0-2 is no reverse shell).
SERVICE_MANAGERS = ("/usr/lib/systemd/systemd", "/usr/bin/containerd-shim*", "/usr/bin/runc",
                    "/usr/sbin/runc", "/usr/bin/crun", "/usr/bin/conmon", "/usr/sbin/inetd",
                    "/usr/sbin/openbsd-inetd", "/usr/sbin/xinetd", "/usr/bin/tcpserver")
# Remote-access and remote-execution daemons: they hold a job's pty or pipes and the
# connection it is driven over (ssh, Slurm's srun, MPI launchers), so a shell they feed
# is a login or a job, not a reverse shell (breach.stdio_network).
REMOTE_ACCESS = ("/usr/sbin/sshd", "/usr/lib/openssh/sshd-session",
                 "/usr/libexec/openssh/sshd-session", "/usr/sbin/dropbear",
                 "/usr/bin/mosh-server", "/usr/sbin/in.telnetd", "/usr/sbin/slurmstepd",
                 "/usr/bin/orted", "/usr/bin/prted", "/usr/bin/hydra_pmi_proxy")
PACKAGE_MANAGERS = ("/usr/bin/dpkg", "/usr/bin/apt", "/usr/bin/apt-get", "/usr/bin/aptitude*",
                    "/usr/bin/rpm", "/usr/bin/dnf5", "/usr/bin/microdnf", "/usr/bin/zypper",
                    "/usr/libexec/packagekitd")
ADMIN_TOOLS = ("/usr/sbin/useradd", "/usr/sbin/usermod", "/usr/sbin/userdel",
               "/usr/sbin/groupadd", "/usr/sbin/groupmod", "/usr/sbin/groupdel",
               "/usr/sbin/newusers", "/usr/sbin/chpasswd", "/usr/sbin/chgpasswd",
               "/usr/bin/passwd", "/usr/bin/gpasswd", "/usr/bin/chage", "/usr/bin/chsh",
               "/usr/bin/chfn", "/usr/sbin/vipw", "/usr/sbin/vigr", "/usr/sbin/visudo",
               "/usr/sbin/pwconv", "/usr/sbin/grpconv")
# root's ssh files that grant or run something (keys, ~/.ssh/rc run at each login, the
# environment sshd sets), not the whole directory: root's `ssh` appends known_hosts.
CREDENTIAL_PATHS = ("/etc/shadow*", "/etc/gshadow*", "/etc/passwd*", "/etc/group*",
                    "/etc/sudoers*", "/root/.ssh/authorized_keys*", "/root/.ssh/rc",
                    "/root/.ssh/environment", "*/.ssh/authorized_keys",
                    "*/.ssh/authorized_keys2")
# The lists of executables (rules test an event's `exe_is`/`ancestors_are` against these
# names) and the keys older configs used for comm names, refused with one sentence.
# Debuggers and profilers root attaches to users' jobs with (breach.ptrace_other_user).
DEBUGGERS = ("/usr/bin/gdb", "/usr/bin/strace", "/usr/bin/ltrace", "/usr/bin/py-spy",
             "/usr/local/bin/py-spy", "/usr/bin/perf", "/usr/bin/perf_*", "/usr/bin/lldb*",
             "/usr/bin/criu")
EXE_LISTS = ("shells", "services", "service_managers", "package_managers", "admin_tools",
             "bpf_loaders", "remote_access", "debuggers", "loaders")
# The dynamic loaders: run as a program (ld.so ./miner) the kernel's executable is the
# loader, so its exec is always sent and the program it runs is judged too (exec policy).
LOADERS = ("/usr/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
           "/usr/lib/ld-linux-aarch64.so.1", "/usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
           "/usr/lib/ld-linux.so.2", "/usr/lib/i386-linux-gnu/ld-linux.so.2",
           "/usr/lib/ld-musl-x86_64.so.1", "/usr/lib/ld-musl-aarch64.so.1",
           "/lib/ld-musl-x86_64.so.1", "/lib/ld-musl-aarch64.so.1")
REPLACED = {"service_comms": "services"}
REFRESH_S = 10.0
