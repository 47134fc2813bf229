from dlc_snapshot_fix.cli import main

main(prog_name="dlc-snapshot-fix")
