#!/bin/busybox sh
# pid 1: busybox init reads /etc/inittab (rc.init at boot, rc.shutdown on poweroff,
# reboot or halt), reaps orphans and turns SIGUSR2/SIGTERM/SIGUSR1 into poweroff, reboot
# and halt, as in LinuxKit. A script rather than a symlink: the image is made with COPY only.
exec /bin/busybox init
