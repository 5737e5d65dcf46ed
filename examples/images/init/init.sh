#!/bin/busybox sh
# Stage 1, run by the kernel from the initramfs: move the root filesystem to a tmpfs, then
# switch_root to /sbin/init (busybox init, which runs /usr/lib/forge/rc.init).
#
# Why move it: runc puts each container in its root with pivot_root(2), and pivot_root
# refuses to move the initramfs (the kernel's own rootfs mount, which can never be
# unmounted). `runc run --no-pivot` would work here without the move, but then runc only
# chroots into the container's root: the host's whole tree stays mounted in the
# container's mount namespace, reachable by a process allowed to chroot. LinuxKit makes
# the same choice. Files are moved one top-level entry (and one bundle) at a time, so the
# extra memory needed is the largest of those rather than the whole image.
#
# Booted from a disk (the kernel ran /sbin/init directly) none of this happens.

bb=/bin/busybox
log() { echo "forge-init: $*"; }

case $($bb stat -f -c %T /) in
tmpfs|ramfs) ;;
*) exec /sbin/init ;;
esac

log "moving the root filesystem from the initramfs to a tmpfs"
new=/.forge-root
$bb mkdir -p $new
$bb mount -t tmpfs -o mode=0755 root $new || { log "cannot mount a tmpfs: staying on the initramfs"; exec /sbin/init; }

move() {
	$bb mv "$1" "$2" || log "cannot move $1"
}

for e in /* /.[!.]*; do
	[ -e "$e" ] || [ -L "$e" ] || continue
	case $e in
	# /bin holds the busybox this script runs with: it goes last. switch_root checks
	# that /init exists (its sign of an initramfs) and deletes it with what is left.
	/bin | /init | $new) ;;
	/containers)
		$bb mkdir -p $new/containers
		for kind in /containers/*; do
			if [ ! -d "$kind" ]; then
				move "$kind" $new/containers/
				continue
			fi
			$bb mkdir -p "$new$kind"
			for bundle in "$kind"/*; do
				[ -e "$bundle" ] && move "$bundle" "$new$kind/"
			done
		done
		;;
	*) move "$e" $new/ ;;
	esac
done
$bb cp -a /init $new/init
move /bin $new/
exec $new/bin/busybox switch_root $new /sbin/init
