"""Output commit protocol (atomic files, staged directories, locks) and output/device checks.
The bottom layer: imports nothing else from qru."""
from qru.io.atomic import (FAULT_ENV, FAULT_LOG_ENV, OutputError, OutputLockedError, append_text, carry_over, clean_stale,
                           clean_stale_in, commit_dir, fault_point, lock_path, pid_alive, read_json, stage_path, staged_dir, staged_file,
                           target_lock, write_bytes, write_json, write_text)
from qru.io.targets import DeviceError, UnsafeOutputError, check_device, check_output

__all__ = ["FAULT_ENV", "FAULT_LOG_ENV", "OutputError", "OutputLockedError", "append_text", "carry_over", "clean_stale",
           "clean_stale_in", "commit_dir", "fault_point", "lock_path", "pid_alive", "read_json", "stage_path", "staged_dir", "staged_file",
           "target_lock", "write_bytes", "write_json", "write_text", "DeviceError", "UnsafeOutputError",
           "check_device", "check_output"]
