# Sourced by rc.init and rc.shutdown: logging, and running one OCI bundle with runc.
#
# A bundle is /containers/{onboot,onshutdown}/NNN-<name>/ or /containers/services/<name>/:
# config.json (the OCI runtime spec), runtime.json (LinuxKit's runtime extras), and the
# image's files in rootfs/ (read-only entries) or lower/ (writable entries: an overlay
# with a tmpfs upper layer is mounted at rootfs/ first).

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
set -o pipefail  # a pipeline's status is runc's, not that of the log writer after it

LIB=${FORGE_LIB:-/usr/lib/forge}  # FORGE_LIB and FORGE_CONSOLE: for tests on the host
CONSOLE=${FORGE_CONSOLE:-/dev/console}
US=$(printf '\037')  # field separator of runtime-json.awk's output

log() {
	local up=
	[ -r /proc/uptime ] && read -r up _ </proc/uptime
	echo "forge-init: ${up:+[${up}s] }$*" >>"$CONSOLE"
}

# Whole seconds since boot.
uptime_s() {
	local up
	read -r up _ </proc/uptime
	echo "${up%.*}"
}

# Copies stdin, line by line, to the console prefixed with "<name>: " and to
# /var/log/<name>.log.
log_output() {
	awk -v p="$1: " -v f="/var/log/$1.log" '{ print p $0; fflush(); print >>f; fflush(f) }' >>"$CONSOLE"
}

# Makes the mounts and directories a bundle needs before runc runs it. What must be done
# once the container's namespaces exist (runtime.json's interfaces and bindNS) is left to
# runtime-hook, which runc calls as the bundle's createRuntime hook (added to config.json
# here). Sets NAMESPACE to runtime.json's namespace (empty without one).
prepare_bundle() {
	local dir=$1 actions what type src dest opts hook=
	NAMESPACE=
	if [ -d "$dir/lower" ]; then
		# Writable: the image stays as it is in lower/, writes go to a tmpfs of its own.
		mkdir -p "$dir/tmp" "$dir/rootfs"
		mount -t tmpfs -o mode=0755 tmpfs "$dir/tmp" || return 1
		mkdir -p "$dir/tmp/upper" "$dir/tmp/work"
		if ! mount -t overlay -o "lowerdir=$dir/lower,upperdir=$dir/tmp/upper,workdir=$dir/tmp/work" \
			overlay "$dir/rootfs"; then
			log "${dir##*/}: cannot mount an overlay for its writable root (is the kernel's overlay module loaded?)"
			umount "$dir/tmp"
			return 1
		fi
	fi
	[ -f "$dir/runtime.json" ] || return 0
	actions=$(awk -f $LIB/runtime-json.awk "$dir/runtime.json") || return 1
	# As LinuxKit: mounts first (so mkdir can make directories inside them), then mkdir,
	# then cgroups. A relative path is inside the container's rootfs.
	while IFS=$US read -r what type src dest opts; do
		case $what in
		mount)
			case $dest in /*) ;; *) dest=$dir/rootfs/$dest ;; esac
			mkdir -p "$dest" || return 1
			# LinuxKit also creates an overlay's upperdir and workdir.
			for o in $(echo "$opts" | tr , ' '); do
				case $o in upperdir=* | workdir=*) mkdir -p "${o#*=}" ;; esac
			done
			case $type,$opts in
			bind,* | *bind*) type= ;;  # busybox mount wants no -t for a bind mount
			esac
			mount ${type:+-t "$type"} ${opts:+-o "$opts"} "$src" "$dest" || return 1
			;;
		mkdir)
			case $type in /*) ;; *) type=$dir/rootfs/$type ;; esac
			mkdir -p "$type" || return 1
			;;
		cgroup)
			mkdir -p "/sys/fs/cgroup/$type" || return 1
			;;
		iface | bindns)
			hook=1
			;;
		namespace)
			NAMESPACE=$type
			;;
		esac
	done <<EOF
$actions
EOF
	[ -z "$hook" ] || add_runtime_hook "$dir/config.json"
}

# Adds runtime-hook as a createRuntime hook of a config.json (once): runc runs it after
# it made the container's namespaces and before the container's process starts, with the
# container's state (its pid, its bundle) on stdin.
add_runtime_hook() {
	local config=$1
	grep -q "$LIB/runtime-hook" "$config" && return 0
	if grep -q '"hooks"' "$config"; then
		log "$config already has hooks: runtime.json's interfaces and bindNS are not applied"
		return 1
	fi
	# forge writes config.json with the opening brace alone on the first line.
	awk -v hook="$LIB/runtime-hook" -v lib="$LIB" -v path="$PATH" 'NR == 1 {
		print
		printf "    \"hooks\": {\"createRuntime\": [{\"path\": \"%s\", \"args\": [\"runtime-hook\"], ", hook
		printf "\"env\": [\"PATH=%s\", \"FORGE_LIB=%s\"]}]},\n", path, lib
		next
	} { print }' "$config" >"$config.new" && mv "$config.new" "$config"
}

# The runc state directory of a service: runc's default, or one per LinuxKit (containerd)
# namespace, so that `runc --root /run/forge/runc/<namespace> list` lists that namespace.
runc_root() {
	if [ -n "$1" ]; then echo "/run/forge/runc/$1"; else echo /run/runc; fi
}

# Undoes prepare_bundle's overlay (runtime.json's mounts stay, as in LinuxKit).
cleanup_bundle() {
	local dir=$1
	if [ -d "$dir/lower" ]; then
		umount "$dir/rootfs" 2>/dev/null
		umount "$dir/tmp" 2>/dev/null
	fi
}

# Runs the bundles under /containers/<kind>/ one after another, each to completion.
run_bundles() {
	local kind=$1 dir id code
	for dir in /containers/$kind/*; do
		[ -f "$dir/config.json" ] || continue
		id=${dir##*/}
		if ! prepare_bundle "$dir"; then
			log "$kind $id: cannot prepare the bundle: not run"
			continue
		fi
		log "$kind $id: starting"
		runc run --bundle "$dir" "$id" </dev/null 2>&1 | log_output "$id"
		code=$?
		log "$kind $id: exited with code $code"
		cleanup_bundle "$dir"
	done
}
