#!/usr/bin/env bash
# Builds the swarm-agent and swarm-mesh packages from this checkout:
#   dist/swarm-agent_<version>_<debarch>.deb        (deb: dpkg-deb)
#   dist/swarm-agent-<version>-1.<arch>.rpm         (rpm: rpmbuild)
#   dist/swarm-mesh_<version>_<debarch>.deb         (mesh-deb)
#   dist/swarm-mesh-<version>-1.<arch>.rpm          (mesh-rpm)
# The version comes from pyproject.toml, the dependencies from packaging/dependencies
# (the agent) and packaging/mesh-dependencies (the mesh).
#
#   packaging/build.sh                 # all four
#   packaging/build.sh deb             # only these (any of: deb rpm mesh-deb mesh-rpm)
#   packaging/build.sh mesh-deb mesh-rpm
#
# Needs make/clang/bpftool for the agent's probes (install.sh), dpkg-deb, rpmbuild
# (apt-get install rpm). The mesh packages need no probes.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

[ $# -gt 0 ] || set -- deb rpm mesh-deb mesh-rpm
formats=("$@")
agent=0
for f in "${formats[@]}"; do
  case "$f" in
    deb|rpm) agent=1 ;;
    mesh-deb|mesh-rpm) ;;
    *) echo "build.sh: unknown format $f (deb, rpm, mesh-deb or mesh-rpm)" >&2; exit 2 ;;
  esac
done

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
code_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)
if [ "$version" != "$code_version" ]; then
  # `swarm-agent --version` must tell the truth about the package it came in.
  echo "build.sh: pyproject.toml says $version but agent/__init__.py says $code_version" >&2
  exit 1
fi

git rev-parse --is-inside-work-tree >/dev/null 2>&1 \
  || { echo "build.sh: needs a git checkout (it ships the files git tracks)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p dist

# tracked PATH...: the files git tracks under PATH, NUL-separated; fails on one missing.
tracked() {
  local f
  while IFS= read -r -d '' f; do
    [ -e "$f" ] || { echo "build.sh: $f is tracked but missing from the tree" >&2; return 1; }
    printf '%s\0' "$f"
  done < <(git ls-files -z -- "$@")
}

# refuse_lab FILE...: never the lab (attack generators, demo scenarios), tests or benches.
refuse_lab() {
  local banned
  banned=$(printf '%s\n' "$@" | grep -E '(^|/)(swarmlab|attacks|tests|bench)/|(^|/)(lab|breachlab|scenario|demo)\.py$' || true)
  [ -z "$banned" ] || { echo "build.sh: refusing to ship lab or test code: $banned" >&2; exit 1; }
}

shipped=()
if [ "$agent" = 1 ]; then
  # The probes are compiled here, once, and travel in the package (CO-RE: they relocate
  # against the provider's kernel BTF at load time, no compiler or headers needed there).
  make -s -C probes
  objs=(agent/probes/*.bpf.o)
  [ -e "${objs[0]}" ] || { echo "build.sh: no compiled probes in agent/probes/" >&2; exit 1; }
  # What ships: agent/ as git tracks it, plus the compiled probes.
  tracked agent > "$work/agent.list"
  mapfile -d '' -t shipped < "$work/agent.list"
  for o in "${objs[@]}"; do
    [ "$(basename "$o")" = abi.bpf.o ] || shipped+=("$o")
  done
  untracked=$(git ls-files --others --exclude-standard -- agent)
  [ -z "$untracked" ] || echo "build.sh: not shipped (untracked): $(echo $untracked)" >&2
  refuse_lab "${shipped[@]}"
fi

mesh_shipped=()
case " ${formats[*]} " in *" mesh-"*)
  # The mesh: mesh/ as git tracks it, plus its private copy of the agent modules it
  # imports (packaging/mesh_imports.py follows the imports; tracked files only).
  tracked mesh > "$work/mesh.list"
  python3 packaging/mesh_imports.py . > "$work/needed.list"
  [ -s "$work/needed.list" ] || { echo "build.sh: mesh_imports.py found no agent modules" >&2; exit 1; }
  mapfile -t needed < "$work/needed.list"
  untracked=$(git ls-files --others --exclude-standard -- "${needed[@]}")
  [ -z "$untracked" ] || { echo "build.sh: the mesh imports untracked files: $(echo $untracked)" >&2; exit 1; }
  tracked "${needed[@]}" >> "$work/mesh.list"
  mapfile -d '' -t mesh_shipped < "$work/mesh.list"
  refuse_lab "${mesh_shipped[@]}"
  ;;
esac


# stage ROOT UNITDIR: the installed file system, the same for both formats but for where
# the distribution keeps systemd units.
stage() {
  local root=$1 unitdir=$2 lib=$1/usr/lib/swarm-agent
  install -d -m 0755 "$root/usr/bin" "$lib" "$root$unitdir" "$root/etc/swarm-agent/rules" \
    "$root/usr/share/doc/swarm-agent"
  install -d -m 0700 "$root/var/lib/swarm-agent"
  # The Python package as committed (modules, rules, generated gRPC code: git's own list,
  # so a hand-kept list cannot rot and an untracked file in the tree never ships) and the
  # probes compiled above (abi.bpf.o only mirrors the event structs for tests: not shipped).
  printf '%s\0' "${shipped[@]}" | tar -C "$top" --null -T - -cf - \
    | tar -C "$lib" -xf - --no-same-owner
  # Rules live in /etc (conffiles: local tuning survives upgrades); the package keeps a
  # symlink where agent.config looks for its default rules.
  local rule
  for rule in "$lib"/agent/rules/*.yaml; do
    mv "$rule" "$root/etc/swarm-agent/rules/"
    ln -s "/etc/swarm-agent/rules/$(basename "$rule")" "$rule"
  done
  install -m 0755 packaging/swarm-agent "$root/usr/bin/swarm-agent"
  install -m 0644 packaging/config.yaml "$root/etc/swarm-agent/config.yaml"
  install -m 0644 packaging/swarm-agent.service "$root$unitdir/swarm-agent.service"
  install -m 0644 README.md "$root/usr/share/doc/swarm-agent/README.md"
  install -m 0644 packaging/README.md "$root/usr/share/doc/swarm-agent/README.packaging.md"
  printf 'swarm-agent\nLicense: Apache-2.0\nOn Debian systems the full license is in /usr/share/common-licenses/Apache-2.0.\n' \
    > "$root/usr/share/doc/swarm-agent/copyright"
  find "$lib" -type d -exec chmod 0755 {} +
  find "$lib" -type f -exec chmod 0644 {} +
}

# deps COLUMN [FILE [KINDS]]: the dependencies of one family (1: Debian, 2: RPM) whose
# third column is one of KINDS (space-separated; "required" for none), comments and "-"
# dropped.
deps() {
  awk -F'|' -v col="$1" -v kinds=" ${3:-required} " '!/^[[:space:]]*(#|$)/ {
      d = $col; k = $3; gsub(/^[[:space:]]+|[[:space:]]+$/, "", d)
      gsub(/^[[:space:]]+|[[:space:]]+$/, "", k); if (k == "") k = "required"
      if (d != "-" && d != "" && index(kinds, " " k " ")) print d }' \
    "${2:-packaging/dependencies}"
}

# commas: one line per dependency -> "a, b, c"
commas() { paste -sd, | sed 's/,/, /g'; }

build_deb() {
  local arch root=$work/deb out
  arch=$(dpkg --print-architecture)
  out=dist/swarm-agent_${version}_${arch}.deb
  stage "$root" /lib/systemd/system
  install -d "$root/DEBIAN"
  install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
  # Everything under /etc is a conffile: dpkg keeps an admin's edits on upgrade.
  (cd "$root" && find etc -type f | sort | sed 's|^|/|') > "$root/DEBIAN/conffiles"
  cat > "$root/DEBIAN/control" <<EOF
Package: swarm-agent
Version: $version
Architecture: $arch
Maintainer: Swarm <packages@swarm.invalid>
Section: admin
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $(deps 1 | commas)
Description: Swarm node security agent (eBPF detection, nftables mitigation)
 The security agent of Swarm GPU provider machines: eBPF probes feed an
 in-process detector that mitigates attacks through nftables within a fraction
 of a second, recording incidents and mitigations in a local SQLite store.
EOF
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
  # Built aside and renamed: a concurrent build (or test) never sees half a package.
  dpkg-deb --root-owner-group -Zxz --build "$root" "$work/out.deb" >/dev/null
  mv -f "$work/out.deb" "$out"
  echo "$out"
}

build_rpm() {
  local arch root=$work/rpmroot out
  arch=$(uname -m)
  out=dist/swarm-agent-${version}-1.${arch}.rpm
  stage "$root" /usr/lib/systemd/system
  # The file list from the staged tree: config files noreplace (an edited file is kept and
  # the new one lands as .rpmnew), our directories owned, the state directory private.
  {
    echo '%dir %attr(0755,root,root) /etc/swarm-agent'
    echo '%dir %attr(0755,root,root) /etc/swarm-agent/rules'
    (cd "$root" && find etc -type f | sort | sed 's|^|%config(noreplace) %attr(0644,root,root) /|')
    echo '%dir %attr(0700,root,root) /var/lib/swarm-agent'
    (cd "$root" && find usr/lib/swarm-agent usr/share/doc/swarm-agent -type d | sort | sed 's|^|%dir /|')
    (cd "$root" && find usr \( -type f -o -type l \) | sort | sed 's|^|/|')
  } > "$work/files.list"
  local requires
  requires=$(deps 2 | sed 's/^/Requires:       /')
  awk -v v="$version" -v a="$arch" -v r="$requires" \
    '{ gsub(/@VERSION@/, v); gsub(/@ARCH@/, a); if ($0 == "@REQUIRES@") print r; else print }' \
    packaging/rpm/swarm-agent.spec.in > "$work/swarm-agent.spec"
  rpmbuild -bb --quiet \
    --define "_topdir $work/rpmbuild" \
    --define "_rpmdir $work/out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "stage $root" \
    --define "filelist $work/files.list" \
    "$work/swarm-agent.spec" >/dev/null
  mv -f "$work/out/$(basename "$out")" "$out"
  echo "$out"
}

# stage_mesh ROOT UNITDIR: the swarm-mesh package's installed file system.
stage_mesh() {
  local root=$1 unitdir=$2 lib=$1/usr/lib/swarm-mesh doc=$1/usr/share/doc/swarm-mesh
  install -d -m 0755 "$root/usr/bin" "$lib" "$root$unitdir" "$doc" "$root/etc/swarm-mesh"
  install -d -m 0700 "$root/var/lib/swarm-mesh"
  # mesh/ and the agent modules it imports, as committed.
  printf '%s\0' "${mesh_shipped[@]}" | tar -C "$top" --null -T - -cf - \
    | tar -C "$lib" -xf - --no-same-owner
  install -m 0755 packaging/swarm-mesh "$root/usr/bin/swarm-mesh"
  install -m 0644 packaging/swarm-mesh.service "$root$unitdir/swarm-mesh.service"
  install -m 0644 README.md "$doc/README.md"
  install -m 0644 packaging/README.md "$doc/README.packaging.md"
  install -m 0644 packaging/mesh.yaml "$doc/mesh.yaml"
  printf '%s\n' "swarm-mesh" "License: Apache-2.0" \
    "On Debian systems the full license is in /usr/share/common-licenses/Apache-2.0." \
    "agent/_vendor/nats is nats-py (Apache-2.0): /usr/lib/swarm-mesh/agent/_vendor/LICENSE.nats-py" \
    > "$doc/copyright"
  find "$lib" -type d -exec chmod 0755 {} +
  find "$lib" -type f -exec chmod 0644 {} +
}

build_mesh-deb() {
  local arch root=$work/mesh-deb out
  arch=$(dpkg --print-architecture)
  out=dist/swarm-mesh_${version}_${arch}.deb
  stage_mesh "$root" /lib/systemd/system
  # postinst makes them, owned by the service's user (absent at build time); shipped, dpkg
  # would set them back to root's on every upgrade.
  rmdir "$root/etc/swarm-mesh" "$root/etc" "$root/var/lib/swarm-mesh" "$root/var/lib" "$root/var"
  install -d "$root/DEBIAN"
  install -m 0755 packaging/deb/swarm-mesh/postinst packaging/deb/swarm-mesh/prerm \
    packaging/deb/swarm-mesh/postrm "$root/DEBIAN/"
  # No conffiles: what is in /etc/swarm-mesh, `swarm-mesh init` makes.
  cat > "$root/DEBIAN/control" <<EOF
Package: swarm-mesh
Version: $version
Architecture: $arch
Maintainer: Swarm <packages@swarm.invalid>
Section: net
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $(deps 1 packaging/mesh-dependencies "required pre" | commas)
Recommends: $(deps 1 packaging/mesh-dependencies recommends | commas)
Description: Swarm mesh service (fleet reports, signed fleet decisions)
 The mesh service of Swarm: receives every node's incidents, mitigations and
 heartbeats over mutual TLS, stores them (SQLite or PostgreSQL), decides fleet
 blocks under a trust policy and publishes them signed (Ed25519) on NATS
 JetStream, running nats-server itself.
EOF
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
  dpkg-deb --root-owner-group -Zxz --build "$root" "$work/mesh-out.deb" >/dev/null
  mv -f "$work/mesh-out.deb" "$out"
  echo "$out"
}

build_mesh-rpm() {
  local arch root=$work/mesh-rpmroot out
  arch=$(uname -m)
  out=dist/swarm-mesh-${version}-1.${arch}.rpm
  stage_mesh "$root" /usr/lib/systemd/system
  # The config directory is root's, readable by the service's group; the state its own.
  {
    echo '%dir %attr(0750,root,swarm-mesh) /etc/swarm-mesh'
    echo '%dir %attr(0700,swarm-mesh,swarm-mesh) /var/lib/swarm-mesh'
    (cd "$root" && find usr/lib/swarm-mesh usr/share/doc/swarm-mesh -type d | sort | sed 's|^|%dir /|')
    (cd "$root" && find usr \( -type f -o -type l \) | sort | sed 's|^|/|')
  } > "$work/mesh-files.list"
  local requires
  requires=$( { deps 2 packaging/mesh-dependencies required | sed 's/^/Requires:       /'
                deps 2 packaging/mesh-dependencies pre | sed 's/^/Requires(pre):  /'
                deps 2 packaging/mesh-dependencies recommends | sed 's/^/Recommends:     /'; } )
  awk -v v="$version" -v a="$arch" -v r="$requires" \
    '{ gsub(/@VERSION@/, v); gsub(/@ARCH@/, a); if ($0 == "@REQUIRES@") print r; else print }' \
    packaging/rpm/swarm-mesh.spec.in > "$work/swarm-mesh.spec"
  rpmbuild -bb --quiet \
    --define "_topdir $work/mesh-rpmbuild" \
    --define "_rpmdir $work/mesh-out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "stage $root" \
    --define "filelist $work/mesh-files.list" \
    "$work/swarm-mesh.spec" >/dev/null
  mv -f "$work/mesh-out/$(basename "$out")" "$out"
  echo "$out"
}

for f in "${formats[@]}"; do
  "build_$f"
done
