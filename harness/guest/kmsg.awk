# Attribute the guest kernel's log records to the operations of the plan (run by init.sh,
# once, on `dmesg -c -r` read after the plan; /etc/cbw/kmsg.awk in the guest).
# Input lines: "<L>[    T] text", a kernel record (facility 0: L is its level, 0..7), and
# "<F>[    T] cbw-end N", the marker init writes to /dev/kmsg when operation N ends (user
# facility: F >= 8, which no kernel record has).  The records after the end of operation
# N-1 (or, for N = 0, after the boot drain) up to the end of N are N's: the same cut as
# draining the log after each operation, with no process per operation.
# Output: "CBW-KMSG i=N lvl=L t=T text" for N's records of levels 0..6, printed when N's
# marker is read (records after the last marker belong to no operation and are dropped);
# "CBW-KLOST i=N" if the next marker read is N's but an earlier one was expected: the
# ring buffer overwrote records before they were read, and the records before N's
# marker are not attributed to anything.
BEGIN { op = 0; n = 0 }

/^<[0-9][0-9]+>\[ *[0-9.]+\] cbw-end [0-9]+$/ {
	if ($NF + 0 == op)
		for (k = 0; k < n; k++) print "CBW-KMSG i=" op " " held[k]
	else
		print "CBW-KLOST i=" $NF
	op = $NF + 1
	n = 0
	next
}

match($0, /^<[0-6]>\[ *[0-9.]*\] /) {
	t = substr($0, 5, RLENGTH - 6)
	gsub(/ /, "", t)
	held[n++] = "lvl=" substr($0, 2, 1) " t=" t " " substr($0, RLENGTH + 1)
}
