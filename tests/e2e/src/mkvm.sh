#!/bin/sh
# Builds a VM image (see vm.rs's header): mkvm.sh OUT.zst INIT_TAIL [CONFIG.json]
# VMLINUX=PATH takes that kernel instead of the cloud kernel's bzImage.
# Used by the VM e2e tests (tests/e2e/src/vm.rs) and bench/vm.sh.
set -eu
OUT=$1
KVER=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1)
K=/lib/modules/$KVER/kernel
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/initrd/bin" "$W/initrd/lib" "$W/initrd/proc" "$W/initrd/dev" "$W/initrd/newroot" \
  "$W/root/bin" "$W/root/proc" "$W/root/sys" "$W/root/dev" "$W/root/www" "$W/img"
cp /bin/busybox "$W/initrd/bin/busybox"
cp /bin/busybox "$W/root/bin/busybox"
cp $K/drivers/virtio/virtio_ring.ko $K/drivers/virtio/virtio.ko $K/drivers/virtio/virtio_mmio.ko \
   $K/drivers/block/virtio_blk.ko $K/net/core/failover.ko $K/drivers/net/net_failover.ko \
   $K/drivers/net/virtio_net.ko $K/drivers/input/evdev.ko $K/drivers/acpi/button.ko "$W/initrd/lib/"
cat > "$W/initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net evdev button; do
  /bin/busybox insmod /lib/$m.ko || echo "initrd: insmod $m failed"
done
/bin/busybox mount -t ext4 /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /init
INIT
cat > "$W/root/init" <<'INIT'
#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
# The ACPI power button (its only input device) powers the guest off.
for e in /dev/input/event*; do
  (dd if="$e" of=/dev/null bs=24 count=1 2>/dev/null
   echo "vm: power button pressed, powering off"
   poweroff -f) &
done
if [ -e /sys/class/net/eth0 ]; then
  echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
  ip link set lo up
  ip link set eth0 up
  ip -6 addr add "$PHOENIX_IP/128" dev eth0
  ip -6 route add fe80::1 dev eth0
  ip -6 route add default via fe80::1 dev eth0
fi
INIT
cat "$2" >> "$W/root/init"
if [ -n "${3:-}" ]; then cp "$3" "$W/img/config.json"; fi
chmod 755 "$W/initrd/init" "$W/root/init"
(cd "$W/initrd" && find . | cpio -o -H newc --quiet) > "$W/img/initrd"
if [ -n "${VMLINUX:-}" ]; then cp "$VMLINUX" "$W/img/vmlinux"; else cp /boot/vmlinuz-$KVER "$W/img/bzImage"; fi
mkfs.ext4 -q -d "$W/root" "$W/img/rootfs.ext4" 16M >/dev/null
tar -C "$W/img" -c . | zstd -q -f -o "$OUT"
