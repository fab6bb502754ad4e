"""Block graphs: blkdebug rules, images offline, the NBD export."""
