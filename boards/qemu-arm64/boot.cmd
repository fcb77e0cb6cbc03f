# pvpy boot script for qemu-arm64 (U-Boot 2023.01, Debian u-boot-qemu). mkimage -T script.
# pvpy image build (pvpy/workstation/image/revision.py) writes it to /boot.scr of the
# storage partition.
#
# Disk: p1 = storage (ext4): /bootenv (pvpy's file boot env: pv_rev, pv_try; written
# only by pvpy, atomically), /trails/<rev>/boot.env (pv_kernel, pv_initrd, pv_cmdline:
# the revision's BSP objects, derived from its signed state at install time),
# /objects/<sha256>. p2 = "pvmarker": one raw sector holding U-Boot's own try
# marker "pv_trying=N" (0 = none). U-Boot writes only that sector (virtio write),
# never the filesystem; the env flash is read-only here (QEMU 7.2.9+ pflash
# breaks saveenv: "Flash buffer write timeout").
#
# Pantavisor's rule: pv_try set and not yet attempted -> pv_trying=pv_try, boot it
# once; pv_trying == pv_try on a later boot -> that try failed: boot pv_rev and tell
# PID 1 (pv_failed_try=N), which records the failure and clears pv_try.
echo "pvpy-boot: script start"
setenv pv_work 0x40300000
part start virtio 0 2 pv_mstart
setenv pv_rev; setenv pv_try; setenv pv_trying 0
if load virtio 0:1 ${pv_work} /bootenv; then
    env import -t ${pv_work} ${filesize} pv_rev pv_try
fi
virtio read ${pv_work} ${pv_mstart} 1
env import -t ${pv_work} - pv_trying
if test -z "${pv_rev}"; then
    echo "pvpy-boot: no pv_rev in /bootenv: not provisioned"; exit
fi
setenv pv_boot ${pv_rev}
setenv pv_args
if test -n "${pv_try}" && test "${pv_try}" != "${pv_rev}"; then
    if test "${pv_trying}" = "${pv_try}"; then
        echo "pvpy-boot: try ${pv_try} did not commit: falling back to ${pv_rev}"
        setenv pv_args "pv_failed_try=${pv_try}"
    else
        setenv pv_trying ${pv_try}
        env export -t ${pv_work} pv_trying
        virtio write ${pv_work} ${pv_mstart} 1
        setenv pv_boot ${pv_try}
        setenv pv_args "pv_trying=1"
        echo "pvpy-boot: trying revision ${pv_try} once (marker written)"
    fi
elif test "${pv_trying}" != "0"; then
    setenv pv_trying 0
    env export -t ${pv_work} pv_trying
    virtio write ${pv_work} ${pv_mstart} 1
fi
setenv pv_kernel; setenv pv_initrd; setenv pv_cmdline
load virtio 0:1 ${pv_work} /trails/${pv_boot}/boot.env && env import -t ${pv_work} ${filesize} pv_kernel pv_initrd pv_cmdline
echo "pvpy-boot: rev ${pv_boot} [${pv_args}] kernel ${pv_kernel} initrd ${pv_initrd}"
load virtio 0:1 ${kernel_addr_r} /objects/${pv_kernel} || exit
load virtio 0:1 ${ramdisk_addr_r} /objects/${pv_initrd} || exit
setenv bootargs "console=ttyAMA0 ${pv_cmdline} pv_rev=${pv_boot} ${pv_args}"
echo "pvpy-boot: booti, bootargs ${bootargs}"
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
echo "pvpy-boot: booti failed"
