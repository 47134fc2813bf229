"""Real file systems for the tests, mounted as root: where lab archives live, not the build disk.

ext4, btrfs and xfs (with reflink) on loop images; exFAT through ``exfat-fuse`` on a loop
device (the kernel here has no exFAT driver, as many lab workstations); sshfs to a sshd
started on 127.0.0.1 with keys made for it (a network share through FUSE, as sshfs,
smbnetfs and rclone mount them). Images are sparse files in one folder; everything is torn
down by mount point, loop device and PID, whatever state a test left it in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

KINDS = ("ext4", "btrfs", "xfs", "exfat", "sshfs")
COMMANDS = {
    "ext4": ("mkfs.ext4", "losetup", "mount", "umount"),
    "btrfs": ("mkfs.btrfs",),
    "xfs": ("mkfs.xfs",),
    "exfat": ("mkfs.exfat", "mount.exfat-fuse", "fusermount"),
    "sshfs": ("sshfs", "ssh-keygen", "fusermount"),
}
SSHD = "/usr/sbin/sshd"
INSTALL = "apt-get install -y --no-install-recommends exfat-fuse exfatprogs btrfs-progs xfsprogs sshfs openssh-server"


def missing() -> list[str]:
    """What this machine lacks to mount them all (empty: everything is there)."""
    lacking = [name for kind in KINDS for name in COMMANDS[kind] if shutil.which(name) is None]
    lacking += [] if os.path.exists(SSHD) else [SSHD]
    lacking += [] if hasattr(os, "geteuid") and os.geteuid() == 0 else ["root"]
    lacking += [device for device in ("/dev/fuse", "/dev/loop-control") if not os.path.exists(device)]
    return sorted(set(lacking))


def _run(*command: str | Path) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Mounts:
    """File systems mounted under ``folder``; :meth:`close` unmounts them all."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.points: dict[Path, str] = {}
        """Mount point -> its kind."""
        self.loops: dict[Path, str] = {}
        """Mount point -> its loop device (exFAT's FUSE daemon does not free it on its own)."""
        self.sshd: subprocess.Popen | None = None
        self.sshd_port = 0
        self.made = 0

    def mount(self, kind: str, size_mb: int = 1200, name: str | None = None) -> Path:
        """A new, empty file system of ``kind``; its mount point."""
        self.made += 1
        name = name or f"{kind}-{self.made}"
        point = self.folder / name
        point.mkdir(parents=True)
        if kind == "sshfs":
            return self._mount_sshfs(point)
        image = self.folder / f"{name}.img"
        with open(image, "wb") as stream:
            stream.truncate(size_mb << 20)
        if kind == "ext4":
            _run("mkfs.ext4", "-q", "-F", image)
        elif kind == "btrfs":
            _run("mkfs.btrfs", "-q", "-f", image)
        elif kind == "xfs":
            _run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", image)
        elif kind == "exfat":
            _run("mkfs.exfat", image)
        else:
            raise ValueError(kind)
        device = _run("losetup", "--find", "--show", image).strip()
        self.loops[point] = device
        if kind == "exfat":
            _run("mount.exfat-fuse", device, point)
        else:
            _run("mount", "-t", kind, device, point)
        self.points[point] = kind
        return point

    def _mount_sshfs(self, point: Path) -> Path:
        keys = self.folder / "ssh"
        if self.sshd is None:
            keys.mkdir()
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / "host_key")
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / "client_key")
            shutil.copyfile(keys / "client_key.pub", keys / "authorized_keys")
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
            self.sshd_port = _free_port()
            self.sshd = subprocess.Popen(
                [
                    SSHD,
                    "-D",
                    "-e",
                    "-f",
                    "/dev/null",
                    "-p",
                    str(self.sshd_port),
                    "-o",
                    "ListenAddress=127.0.0.1",
                    "-o",
                    f"HostKey={keys / 'host_key'}",
                    "-o",
                    f"AuthorizedKeysFile={keys / 'authorized_keys'}",
                    "-o",
                    "PermitRootLogin=prohibit-password",
                    "-o",
                    "StrictModes=no",
                    "-o",
                    "Subsystem=sftp internal-sftp",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(self.folder / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.sshd_port)) == 0:
                        break
                time.sleep(0.05)
        export = self.folder / f"{point.name}-export"
        export.mkdir()
        self.remount(point, export)
        return point

    def remount(self, point: Path, export: Path | None = None) -> None:
        """Mount the share at ``point`` (again: after :meth:`unmount`)."""
        export = export or self.folder / f"{point.name}-export"
        _run(
            "sshfs", "-p", str(self.sshd_port),
            "-o", f"IdentityFile={self.folder / 'ssh' / 'client_key'},StrictHostKeyChecking=no,"
            "UserKnownHostsFile=/dev/null,BatchMode=yes",
            f"root@127.0.0.1:{export}", point,
        )  # fmt: skip
        self.points[point] = "sshfs"

    def export_of(self, point: Path) -> Path:
        """Where an sshfs share's files really are (what a server sees)."""
        return self.folder / f"{point.name}-export"

    def unmount(self, point: Path, lazy: bool = False) -> None:
        """Unmount; ``lazy``: detach at once though files are open (``fusermount -uz``, ``umount -l``).

        A drive still busy (a file a failed test left open) is detached lazily all the same.
        """
        kind = self.points.pop(point)
        command = ["fusermount", "-u"] if kind in ("exfat", "sshfs") else ["umount"]
        lazily = ["-uz"] if kind in ("exfat", "sshfs") else ["-l"]
        if lazy:
            _run(command[0], *lazily, point)
        else:
            try:
                _run(*command, point)
            except RuntimeError:
                _run(command[0], *lazily, point)
        if point in self.loops:
            for _ in range(50):  # the FUSE daemon lets go of the device a moment after the unmount
                if subprocess.run(["losetup", "-d", self.loops[point]], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            del self.loops[point]
        if not lazy:  # what the drive held is written in its image (or the share's folder): gigabytes per run
            (self.folder / f"{point.name}.img").unlink(missing_ok=True)
            if kind == "sshfs":
                shutil.rmtree(self.export_of(point), ignore_errors=True)

    def close(self) -> None:
        for point in list(self.points):
            with contextlib.suppress(RuntimeError):  # gone already (unmount detaches a busy one lazily)
                self.unmount(point)
        for device in self.loops.values():  # of a drive whose unmount failed
            subprocess.run(["losetup", "-d", device], capture_output=True)
        if self.sshd is not None:
            self.sshd.send_signal(signal.SIGTERM)
            self.sshd.wait(timeout=10)
