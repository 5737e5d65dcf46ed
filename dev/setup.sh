# Set up a development environment for forge. Sourced by dev/setup-and-build.sh and
# dev/test.sh; safe to source again (every step is skipped when already done):
#   - Debian packages forge's tests and tools use, installed only if missing
#     (apt-get through sudo when not root);
#   - a virtual environment in .venv/ at the repository root, with forge installed
#     editable plus its test extras (reinstalled only when pyproject.toml changed);
#   - .venv/bin put first on PATH.
# Set PYTHON to choose the interpreter that creates .venv (default python3, >= 3.11).

forge_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ninja-build: bench/engine's reference; graphviz: `forge graph --format svg`; docker.io:
# the engine for Dockerfile stages that RUN; mmdebstrap: debian_rootfs; docker-registry and
# skopeo: a real registry (and a second client) for the registry tests; cpio and zstd: the
# initramfs tests check forge's archives with the real tools; xorriso, isolinux, syslinux,
# grub-*, mtools, dosfstools, fdisk, qemu-utils: the disk formats (ISO, raw, qcow2);
# squashfs-tools, erofs-utils, fakeroot: the root-image formats (kernel+squashfs|erofs|iso);
# qemu-system-x86 and ovmf: booting images (BIOS and UEFI); busybox-static and runc: the
# reference init; nginx-full: the WebDAV server the remote-cache tests use as a Bazel HTTP cache;
# openssl: the certificates of the TLS remote-cache test; gpg, gpgv, dpkg-dev, apt-utils and
# debian-archive-keyring: the signed test archives (gpg signs, dpkg-scanpackages and
# apt-ftparchive index, gpgv verifies) and the keys of Debian's own archive; python3-apt:
# apt's own sources parser, which tests/formats/debian/test_sources.py checks forge's
# against (through /usr/bin/python3); pigz: a second gzip writer (with zstd's pzstd) for
# the multi-member and multi-frame decoding tests; tinyproxy: the real HTTP proxy the HTTP
# client's tests go through (each test starts its own, never the service); curl: the
# reference the tests check forge's reading of the proxy variables against; u-boot-tools:
# mkimage, which the rpi3 format runs; squashfs-tools, erofs-utils and fakeroot: the
# root-image formats.
# qemu-system-arm and qemu-efi-aarch64: booting arm64 images (TCG; AAVMF for UEFI);
# qemu-user-static, binfmt-support and arch-test: building for arm64 on another machine
# (RUN steps and mmdebstrap's maintainer scripts run under qemu-user through binfmt_misc).
# cryptsetup-bin: veritysetup, the dm-verity hash tree of `verity = True`; dmsetup and
# binutils (readelf): the verity tests put the host's dmsetup in a boot initrd and check
# forge's ELF reading against readelf.
# sbsigntool and faketime: Secure Boot signing of the UKI and ESP loaders (sbsign, run
# under faketime at SOURCE_DATE_EPOCH so the signature's time is fixed), sbverify in the tests.
forge_apt_packages=(ninja-build graphviz git docker.io mmdebstrap docker-registry skopeo cpio zstd
    xorriso isolinux syslinux syslinux-common grub-common grub-pc-bin grub-efi-amd64-bin mtools
    dosfstools fdisk qemu-system-x86 qemu-utils ovmf busybox-static runc nginx-full openssl
    gpg gpgv dpkg-dev apt-utils debian-archive-keyring python3-apt pigz tinyproxy curl
    squashfs-tools erofs-utils fakeroot u-boot-tools qemu-system-arm qemu-efi-aarch64
    qemu-user-static binfmt-support arch-test
    cryptsetup-bin dmsetup binutils sbsigntool faketime)
if command -v dpkg >/dev/null 2>&1; then
    forge_missing=()
    for forge_pkg in "${forge_apt_packages[@]}"; do
        dpkg -s "$forge_pkg" >/dev/null 2>&1 || forge_missing+=("$forge_pkg")
    done
    if ((${#forge_missing[@]})); then
        if [ "$(id -u)" -eq 0 ]; then
            forge_sudo=()
        elif command -v sudo >/dev/null 2>&1; then
            forge_sudo=(sudo)
        else
            echo "dev/setup.sh: need root or sudo to install: ${forge_missing[*]}" >&2
            return 1
        fi
        echo "dev/setup.sh: installing ${forge_missing[*]}" >&2
        "${forge_sudo[@]}" apt-get update
        "${forge_sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${forge_missing[@]}"
        # the package enables a system proxy on port 8888: the tests start their own
        if [[ " ${forge_missing[*]} " == *" tinyproxy "* ]]; then
            "${forge_sudo[@]}" systemctl disable --now tinyproxy >/dev/null 2>&1 || true
            if [ -x /etc/init.d/tinyproxy ]; then  # without systemd (containers)
                "${forge_sudo[@]}" /etc/init.d/tinyproxy stop >/dev/null 2>&1 || true
                "${forge_sudo[@]}" update-rc.d tinyproxy disable >/dev/null 2>&1 || true
            fi
        fi
    fi
else
    echo "dev/setup.sh: not a Debian system; make sure ${forge_apt_packages[*]} are installed" >&2
fi

# Foreign-architecture programs (arm64 RUN steps) run through binfmt_misc: mount it if it
# is not, and register qemu-user-static's interpreters (with the F flag, so they work in
# containers). Where that is not allowed (an unprivileged container), say so and go on:
# only the arm64 builds need it, and they fail with the same advice.
if [ ! -e /proc/sys/fs/binfmt_misc/status ] && [ "$(id -u)" -eq 0 ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && command -v update-binfmts >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    elif command -v sudo >/dev/null 2>&1; then
        sudo update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    echo "dev/setup.sh: binfmt_misc has no qemu-aarch64: arm64 builds that RUN commands will" \
        "fail (mount binfmt_misc, then update-binfmts --enable)" >&2
fi

forge_venv="$forge_root/.venv"
if [ ! -x "$forge_venv/bin/python" ]; then
    echo "dev/setup.sh: creating $forge_venv" >&2
    "${PYTHON:-python3}" -m venv "$forge_venv"
fi
forge_stamp="$forge_venv/.forge-installed"
forge_want="$(sha256sum "$forge_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$forge_venv/bin/forge" ] || [ "$(cat "$forge_stamp" 2>/dev/null)" != "$forge_want" ]; then
    echo "dev/setup.sh: installing forge into $forge_venv" >&2
    "$forge_venv/bin/python" -m pip install --quiet --upgrade pip
    "$forge_venv/bin/python" -m pip install --quiet -e "$forge_root[test]"
    echo "$forge_want" > "$forge_stamp"
fi

# Dockerfile stages that RUN need a Docker engine: start Debian's dockerd when none answers.
if [ -z "${DOCKER_HOST:-}" ] && command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] \
        && ! docker info >/dev/null 2>&1; then
    echo "dev/setup.sh: starting dockerd (log: /var/log/forge-dockerd.log)" >&2
    nohup dockerd >/var/log/forge-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || echo "dev/setup.sh: dockerd did not start; see /var/log/forge-dockerd.log" >&2
fi

export PATH="$forge_venv/bin:$PATH"
unset forge_apt_packages forge_missing forge_pkg forge_sudo forge_venv forge_stamp forge_want
