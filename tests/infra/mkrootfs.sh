#!/usr/bin/env bash
# Make a minimal Debian root file system for the test images' base (run as root).
#
#   bash tests/infra/mkrootfs.sh DEST SUITE MIRROR PACKAGES SOURCES_FILE
#
# DEST: an empty or missing folder; SUITE: e.g. bookworm; MIRROR: the Debian mirror URL (the caller
# reads it from the machine's apt configuration, so no host name is written here); PACKAGES: a
# comma-separated list for debootstrap's --include; SOURCES_FILE: a deb822 file that becomes the root
# file system's /etc/apt/sources.list.d/debian.sources (main suite, updates and security).
#
# After debootstrap (--variant=minbase) the packages are upgraded from those sources, so the base
# carries the suite's security fixes; apt and dpkg are configured the way Debian's official container
# images are (-slim flavour); everything an image does not need at run time is removed.
set -euo pipefail

if (($# != 5)); then
  echo "usage: $0 DEST SUITE MIRROR PACKAGES SOURCES_FILE" >&2
  exit 2
fi
dest=$1 suite=$2 mirror=$3 packages=$4 sources=$5
log() { echo "mkrootfs: $*" >&2; }

start=$SECONDS
debootstrap --variant=minbase --include="$packages" "$suite" "$dest" "$mirror" >&2
log "debootstrap: $((SECONDS - start))s"

install -m 0644 "$sources" "$dest/etc/apt/sources.list.d/debian.sources"
rm -f "$dest/etc/apt/sources.list"

# As in Debian's official container images (and what the Dockerfiles' `rm -rf /var/lib/apt/lists/*`
# counts on): apt keeps no package caches (pkgcache.bin and srcpkgcache.bin alone put 80 MB into the
# layer of every `apt-get update`) and fetches no translations; dpkg leaves out documentation, manuals
# and translations, as in the -slim images.
clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
{
  echo "DPkg::Post-Invoke { \"$clean\"; };"
  echo "APT::Update::Post-Invoke { \"$clean\"; };"
  echo 'Dir::Cache::pkgcache "";'
  echo 'Dir::Cache::srcpkgcache "";'
} >"$dest/etc/apt/apt.conf.d/docker-clean"
echo 'Acquire::Languages "none";' >"$dest/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' >"$dest/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$dest/etc/apt/apt.conf.d/docker-autoremove-suggests"
printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
  'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
  'path-include /usr/share/locale/locale.alias' 'path-exclude /usr/share/lintian/*' \
  >"$dest/etc/dpkg/dpkg.cfg.d/docker-slim"

# apt and dpkg in a chroot want /proc; unmount it whatever happens, or the folder cannot be removed.
mount -t proc proc "$dest/proc"
trap 'umount "$dest/proc" 2>/dev/null || true' EXIT
start=$SECONDS
# No daemons may start inside the chroot while packages are configured.
printf '#!/bin/sh\nexit 101\n' >"$dest/usr/sbin/policy-rc.d"
chmod 0755 "$dest/usr/sbin/policy-rc.d"
chroot "$dest" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get -q update >&2
chroot "$dest" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get -q -y upgrade >&2
chroot "$dest" apt-get clean
rm -f "$dest/usr/sbin/policy-rc.d"
umount "$dest/proc"
trap - EXIT
log "upgrade: $((SECONDS - start))s"

# What the dpkg excludes keep out of later installs, removed from what debootstrap installed.
find "$dest/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
find "$dest/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$dest/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$dest"/usr/share/man/* "$dest"/usr/share/info/* "$dest"/usr/share/lintian/*
rm -rf "$dest"/var/lib/apt/lists/* "$dest"/var/cache/apt/*.bin "$dest"/var/cache/apt/archives/*.deb \
  "$dest"/var/cache/debconf/*-old "$dest"/var/lib/dpkg/*-old "$dest"/var/log/apt/* "$dest"/tmp/* "$dest"/root/.cache
find "$dest/var/log" -type f -exec truncate -s 0 {} +
# The runtime provides these per container; the host's copies do not belong in an image.
: >"$dest/etc/resolv.conf"
: >"$dest/etc/hostname"
log "done: $(du -sh "$dest" | cut -f1)"
