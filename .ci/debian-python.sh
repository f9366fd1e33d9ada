#!/usr/bin/env bash
# Usage: .ci/debian-python.sh VERSION DIR      e.g.  .ci/debian-python.sh 3.14 /tmp/py314
#
# Makes a runnable CPython VERSION in DIR from Debian testing's binary packages, for the
# interpreters pyenv here does not have (3.14, 3.15). Prints the interpreter's path on
# stdout, and nothing else there (progress and errors go to stderr).
#
# Why this way: Debian's testing suite (forky) builds them, but against a newer glibc than
# this machine's, and only Debian's mirror and PyPI are reachable. So:
#   1. apt with a PRIVATE sources list, list directory and cache (nothing of the machine's
#      apt state is read or changed), naming forky on the Debian mirror the machine already
#      uses; packages are fetched by NAME only, so a version bump in forky breaks nothing;
#   2. every package unpacked with `dpkg-deb -x` into DIR (nothing installed system-wide),
#      forky's own libc6 and dynamic loader included;
#   3. the interpreter binary patched (with forky's patchelf, run through that loader) to use
#      the unpacked loader and an RPATH of the unpacked library directories. DT_RPATH, not
#      RUNPATH: RPATH also applies to the libraries that extension modules (_ssl, _ctypes,
#      _sqlite3...) pull in when dlopen()ed. A patched binary also works through the
#      symlinks that `python -m venv` makes.
#
# Exit status: 0 ready; 75 the fetch failed (no network, no such package: the caller
# skips); anything else: a real failure.
set -uo pipefail

version=${1:?usage: debian-python.sh VERSION DIR}
dest=${2:?usage: debian-python.sh VERSION DIR}
suite=forky
FETCH_FAILED=75

fetch_failed() { echo "debian-python: fetch failed: $*" >&2; exit $FETCH_FAILED; }
die() { echo "debian-python: $*" >&2; exit 1; }

# The Debian archive mirror the machine's own apt uses: the first enabled "deb" source whose
# URI ends in /debian (not debian-security, not third-party repositories), with its keyring.
# Reads both the one-line format (sources.list, *.list) and deb822 (*.sources).
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        # deb [signed-by=KEYRING ...] URI SUITE COMPONENTS...
        awk '$1 == "deb" {
                 key = ""; i = 2
                 if ($2 ~ /^\[/) { for (; i <= NF; i++) { if ($i ~ /^\[?signed-by=/) { key = $i; sub(/^\[?signed-by=/, "", key); sub(/\]$/, "", key) } if ($i ~ /\]$/) { i++; break } } }
                 uri = $i; sub(/\/$/, "", uri)
                 if (uri ~ /\/debian$/) { print uri, key; exit }
             }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # Stanzas are separated by blank lines; one field per line (comments dropped).
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
                 types = ""; uris = ""; key = ""; enabled = "yes"
                 for (i = 1; i <= NF; i++) {
                     line = $i
                     if (line ~ /^#/) continue
                     name = tolower(line); sub(/:.*/, "", name)
                     value = line; sub(/^[^:]*:[ \t]*/, "", value)
                     if (name == "types") types = value
                     else if (name == "uris") uris = value
                     else if (name == "signed-by") key = value
                     else if (name == "enabled") enabled = tolower(value)
                 }
                 if (enabled == "no" || (" " types " ") !~ / deb /) next
                 n = split(uris, u, /[ \t]+/)
                 for (j = 1; j <= n; j++) { uri = u[j]; sub(/\/$/, "", uri); if (uri ~ /\/debian$/) { print uri, key; exit } }
             }' "$f"
    done
}

read -r mirror keyring < <(find_mirror | head -n1)
[ -n "${mirror:-}" ] || fetch_failed "no Debian mirror found in /etc/apt/sources.list{,.d}"
# An inline (armoured) key in a deb822 file is not a path: fall back to the archive keyring.
[ -n "${keyring:-}" ] && [ -f "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$dest"/apt/lists/partial "$dest"/apt/cache/archives/partial "$dest"/debs "$dest"/root || die "cannot create $dest"
echo "deb [signed-by=$keyring] $mirror $suite main" >"$dest/apt/sources.list"
: >"$dest/apt/status"
apt_opts=(
    -o "Dir::Etc::SourceList=$dest/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$dest/apt/lists"
    -o "Dir::State::Status=$dest/apt/status"
    -o "Dir::Cache=$dest/apt/cache"
    -o "APT::Architectures::=amd64"
    -o "Debug::NoLocking=1"
    -o "Acquire::Retries=3"
)

echo "debian-python: $mirror $suite (keyring $keyring)" >&2
apt-get "${apt_opts[@]}" -q update >"$dest/apt/update.log" 2>&1 \
    || { cat "$dest/apt/update.log" >&2; fetch_failed "apt-get update of $suite"; }
# apt-get update exits 0 even when a source could not be fetched; check the list is there.
apt-cache "${apt_opts[@]}" show "python$version" >/dev/null 2>&1 \
    || { cat "$dest/apt/update.log" >&2; fetch_failed "no package python$version in $suite"; }

# The interpreter, its stdlib, and everything they depend on, found by apt itself rather
# than listed here (libc6, libssl, libffi, zlib, libexpat, libsqlite3, ...). Virtual packages
# (<debconf-2.0>) are dropped; a few harmless data packages (tzdata, netbase) come along.
# patchelf comes from the same suite, so nothing needs installing on the machine.
packages=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances \
        "python$version" "libpython$version-stdlib" patchelf \
    | grep -v '^ ' | grep -v '^<' | sort -u) || die "apt-cache depends failed"
# shellcheck disable=SC2086 # one package name a word
(cd "$dest/debs" && apt-get "${apt_opts[@]}" -q download $packages) >"$dest/apt/download.log" 2>&1 \
    || { cat "$dest/apt/download.log" >&2; fetch_failed "apt-get download"; }

for deb in "$dest"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dest/root" || die "dpkg-deb -x $deb"
done

root=$dest/root
loader=$(find "$root" -name 'ld-linux-x86-64.so.2' \( -type f -o -type l \) | head -n1)
[ -n "$loader" ] || die "no dynamic loader in the unpacked libc6"
libdirs=$(find "$root" -maxdepth 3 -type d -path '*/lib/x86_64-linux-gnu' | paste -sd:)
python=$root/usr/bin/python$version
[ -x "$python" ] || die "no $python in the unpacked packages"

# forky's patchelf, run through forky's loader and libraries (it needs their libstdc++).
# Two separate calls, RPATH first: patchelf 0.18 doing both in one call (or the interpreter
# first) produced a binary that segfaulted in the loader before main (tried on 3.14.8).
patchelf() { "$loader" --library-path "$libdirs" "$root/usr/bin/patchelf" "$@"; }
patchelf --force-rpath --set-rpath "$libdirs" "$python" || die "patchelf --set-rpath failed"
patchelf --set-interpreter "$loader" "$python" || die "patchelf --set-interpreter failed"

# The interpreter must run, and the extension modules a venv, pip and the tests need must load.
"$python" -c 'import ssl, ctypes, sqlite3, zlib, lzma, bz2, pyexpat, venv, sys; print("debian-python:", sys.version.split()[0], ssl.OPENSSL_VERSION, file=sys.stderr)' \
    || die "the unpacked python$version does not run"
echo "$python"
