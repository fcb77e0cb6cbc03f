# pvpy boot script, one for the U-Boot boards (U-Boot 2023.01): qemu-arm64 (Debian's
# u-boot-qemu) and the Raspberry Pis rpi3 and rpi4 (Debian's u-boot-rpi, rpi_arm64).
# mkimage -T script. boards/qemu-arm64/boot.cmd is the file; boards/rpi*/boot.cmd
# link to it. The image build (pvpy/workstation/image/) writes it as /boot.scr: on
# qemu-arm64's storage partition, on the Pi's FAT partition.
#
# A board part says where things are, then one code path chooses, marks and boots:
#   pv_if pv_dp      the storage partition (ext4) for `load`: /trails/<rev>/boot.env
#                    (pv_kernel, pv_initrd, pv_fdt, pv_cmdline: the revision's BSP
#                    objects, derived from its signed state at install time), /objects/
#   pv_rev pv_try    pvpy's boot variables (written only by pvpy, atomically)
#   pv_trying        U-Boot's own try marker (0 = none), kept by `run pv_mark`
#   pv_console, load addresses, pv_fdt_default (the tree when a revision has none)
#
# qemu-arm64: p1 = storage, holding pvpy's boot env /bootenv; p2 = "pvmarker", one raw
# sector holding the marker "pv_trying=N" (virtio write), never the filesystem: the
# env flash is read-only (QEMU 7.2.9+ pflash breaks saveenv: "Flash buffer write
# timeout").
# Raspberry Pi: p1 = FAT (firmware, U-Boot, this script), p2 = storage. U-Boot's
# environment is uboot.env on p1 (16 KiB, one copy): pv_rev and pv_try are in it
# (PID 1 writes them with the uboot-fat backend), and so is the marker (saveenv).
# When uboot.env is torn (a power cut while it was written), U-Boot runs on its
# built-in environment, which has no pv_rev: the committed revision then comes from
# pvrev.env beside it (pvpy writes it after uboot.env, atomically) and a pending try
# is forgotten (PID 1 reports it ERROR).
#
# Pantavisor's rule: pv_try set and not yet attempted -> pv_trying=pv_try, boot it
# once; pv_trying == pv_try on a later boot -> that try failed: boot pv_rev and tell
# PID 1 (pv_failed_try=N), which records the failure and clears pv_try. A marker
# that cannot be written means no try: pv_rev boots and the try is reported failed.
echo "pvpy-boot: script start"
if test "${board}" = "rpi"; then
    setenv pv_work 0x0e000000
    setenv pv_if mmc
    setenv pv_dp 0:2
    setenv pv_console ttyS1,115200
    setenv pv_fdt_addr 0x0f000000
    setenv pv_kernel_addr 0x10000000
    setenv pv_initrd_addr 0x14000000
    setenv pv_fdt_default ${fdt_addr}
    if test -z "${pv_rev}"; then
        echo "pvpy-boot: no pv_rev in the environment: the committed one from pvrev.env"
        if load mmc 0:1 ${pv_work} /pvrev.env; then
            env import -t ${pv_work} ${filesize} pv_rev
        fi
    fi
    if test -z "${pv_trying}"; then
        setenv pv_trying 0
    fi
    setenv pv_mark saveenv
else
    setenv pv_work 0x40300000
    setenv pv_if virtio
    setenv pv_dp 0:1
    setenv pv_console ttyAMA0
    setenv pv_fdt_addr ${fdt_addr_r}
    setenv pv_kernel_addr ${kernel_addr_r}
    setenv pv_initrd_addr ${ramdisk_addr_r}
    setenv pv_fdt_default ${fdtcontroladdr}
    part start virtio 0 2 pv_mstart
    setenv pv_rev; setenv pv_try; setenv pv_trying 0
    if load virtio 0:1 ${pv_work} /bootenv; then
        env import -t ${pv_work} ${filesize} pv_rev pv_try
    fi
    virtio read ${pv_work} ${pv_mstart} 1
    env import -t ${pv_work} - pv_trying
    setenv pv_mark 'env export -t ${pv_work} pv_trying; virtio write ${pv_work} ${pv_mstart} 1'
fi
if test -z "${pv_rev}"; then
    echo "pvpy-boot: no pv_rev: not provisioned"; exit
fi
setenv pv_boot ${pv_rev}
setenv pv_args
if test -n "${pv_try}" && test "${pv_try}" != "${pv_rev}"; then
    if test "${pv_trying}" = "${pv_try}"; then
        echo "pvpy-boot: try ${pv_try} did not commit: falling back to ${pv_rev}"
        setenv pv_args "pv_failed_try=${pv_try}"
    else
        setenv pv_trying ${pv_try}
        if run pv_mark; then
            setenv pv_boot ${pv_try}
            setenv pv_args "pv_trying=1"
            echo "pvpy-boot: trying revision ${pv_try} once (marker written)"
        else
            echo "pvpy-boot: the try marker cannot be written: not trying ${pv_try}"
            setenv pv_args "pv_failed_try=${pv_try}"
        fi
    fi
elif test "${pv_trying}" != "0"; then
    setenv pv_trying 0
    run pv_mark
fi
setenv pv_kernel; setenv pv_initrd; setenv pv_fdt; setenv pv_cmdline
load ${pv_if} ${pv_dp} ${pv_work} /trails/${pv_boot}/boot.env && env import -t ${pv_work} ${filesize} pv_kernel pv_initrd pv_fdt pv_cmdline
echo "pvpy-boot: rev ${pv_boot} [${pv_args}] kernel ${pv_kernel} initrd ${pv_initrd}"
setenv pv_fdt_use ${pv_fdt_default}
if test -n "${pv_fdt}"; then
    load ${pv_if} ${pv_dp} ${pv_fdt_addr} /objects/${pv_fdt} || exit
    setenv pv_fdt_use ${pv_fdt_addr}
    echo "pvpy-boot: device tree ${pv_fdt}"
fi
load ${pv_if} ${pv_dp} ${pv_kernel_addr} /objects/${pv_kernel} || exit
load ${pv_if} ${pv_dp} ${pv_initrd_addr} /objects/${pv_initrd} || exit
setenv bootargs "console=${pv_console} ${pv_cmdline} pv_rev=${pv_boot} ${pv_args}"
echo "pvpy-boot: booti, bootargs ${bootargs}"
booti ${pv_kernel_addr} ${pv_initrd_addr}:${filesize} ${pv_fdt_use}
echo "pvpy-boot: booti failed"
