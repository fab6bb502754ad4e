#!/bin/sh
# PID 1 of the test guest (busybox ash).  Runs the I/O plan given on the kernel
# command line and reports on the console, one line per event, then powers off
# (or, without ACPI, resets: QEMU runs with -no-reboot and exits either way).
# The line formats are the protocol parsed by harness/guest/console.py:
#   CBW-MODFAIL module=NAME err="..."         a module failed to load
#   CBW-NODEV dev=/dev/X waited=S             a disk did not appear in time
#   CBW-READY t=UPTIME                        disks present, about to run the plan
#   CBW-RESULT i=N op=KIND ... err="..."      one line per operation
#   CBW-KMSG i=N lvl=L t=SECONDS text         a kernel message logged while op N ran
#                                             (i=-1: an error logged during boot)
#   CBW-DONE ops=N t=UPTIME                   the plan is over; power off follows
# Parameters: cbw.ops=OP,OP,...  cbw.wait=SECONDS (disk wait, default 10).
# OP (short: the kernel command line holds 2047 bytes): r:DEV:OFF:LEN (read) |
# w:DEV:OFF:LEN:HEX (O_DIRECT write) | f:DEV:OFF:LEN:HEX (buffered write + fsync);
# DEV is the disk's path under /dev/, OFF and LEN in bytes, HEX the byte written.
# CBW-RESULT names them in full: op=read|write|fsyncwrite dev=/dev/DEV.

/bin/busybox --install -s /bin
export PATH=/bin
set -f  # operation tokens are split on ':' and ','; never glob them
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Value of kernel parameter $1; the last occurrence wins, as for the kernel's own.
param() {
	v=""
	for w in $(cat /proc/cmdline); do
		case $w in "$1="*) v=${w#*=} ;; esac
	done
	echo "$v"
}

uptime_s() {
	read -r up _ < /proc/uptime
	echo "$up"
}

# Uptime in centiseconds, for deadlines ("0.05" -> 5, not octal 05).
uptime_cs() {
	read -r up _ < /proc/uptime
	f=${up#*.}
	echo $((${up%.*} * 100 + ${f#0}))
}

# One line, no double quotes: safe inside err="..." / msg="...".
oneline() {
	echo "$*" | tr '\n"' " '" | sed 's/ *$//'
}

# "dd: error writing '/dev/vda': Input/output error" -> "Input/output error"
errno_text() {
	echo "$1" | sed 's/.*: //'
}

# Print as CBW-KMSG lines, tagged with operation $1, the kernel messages of levels
# 0..$2 logged since the last call.  dmesg -c reads the log without blocking and
# marks it read, so each message is attributed to exactly one operation.  (The
# console itself shows only emergencies: loglevel=1, so our lines stay whole.)
# Most operations log nothing: sed runs only when there is something to tag.
kmsg() {
	k=$(dmesg -c -r)
	[ -z "$k" ] || echo "$k" | sed -n "s/^<\([0-$2]\)>\[ *\([0-9.]*\)\] /CBW-KMSG i=$1 lvl=\1 t=\2 /p"
}

# A file of LEN bytes all equal to the byte HEX, made once per (len, byte).
pattern_file() {
	f=/tmp/pat-$1-$2
	[ -f "$f" ] || head -c "$1" /dev/zero | tr '\000' "\\$(printf %03o "0x$2")" > "$f"
	echo "$f"
}

for ko in $(cat /etc/cbw/modules); do
	out=$(insmod "$ko" 2>&1) || echo "CBW-MODFAIL module=$(basename "$ko" .ko) err=\"$(oneline "$out")\""
done

ops=$(param cbw.ops)
wait_s=$(param cbw.wait)
[ -n "$wait_s" ] || wait_s=10
ops=$(echo "$ops" | tr ',' ' ')

# Collect the disks the plan uses, and make the write patterns now, so that an
# operation's timing covers its I/O only.
devs=""
for op in $ops; do
	oldifs=$IFS; IFS=:; set -- $op; IFS=$oldifs
	case $1 in r|w|f)
		case " $devs " in *" /dev/$2 "*) ;; *) devs="$devs /dev/$2" ;; esac ;;
	esac
	case $1 in w|f) pattern_file "$4" "$5" > /dev/null ;; esac
done
# Wait (bounded) for them to appear.
deadline=$(($(uptime_cs) + wait_s * 100))
for d in $devs; do
	while [ ! -b "$d" ] && [ "$(uptime_cs)" -lt $deadline ]; do
		sleep 0.05
	done
	[ -b "$d" ] || echo "CBW-NODEV dev=$d waited=$wait_s"
done

start=$(uptime_s)
kmsg -1 3
echo "CBW-READY t=$start"

i=0
for op in $ops; do
	oldifs=$IFS; IFS=:; set -- $op; IFS=$oldifs
	case $1 in r) kind=read ;; w) kind=write ;; f) kind=fsyncwrite ;; *) kind=$1 ;; esac
	dev=/dev/$2 off=$3 len=$4 pat=$5
	read -r t0 _ < /proc/uptime  # no subshell: under TCG each fork costs
	case $kind in
	read)
		: > /tmp/rd
		msg=$(dd if="$dev" of=/tmp/rd bs="$len" count=1 skip="$off" iflag=skip_bytes,direct status=none 2>&1)
		rc=$?
		read -r t1 _ < /proc/uptime
		got=$(wc -c < /tmp/rd 2>/dev/null || echo 0)
		set -- $(md5sum /tmp/rd)
		md5=$1
		first=$(xxd -p -l 16 /tmp/rd)
		# Whether every byte equals the first: the host tells from md5 (one cmp and
		# one pattern file less per read; each process costs ~17 ms under TCG).
		extra="got=$got md5=$md5 head=$first"
		;;
	write|fsyncwrite)
		src=/tmp/pat-$len-$pat  # made before the plan (pattern_file)
		if [ "$kind" = write ]; then
			msg=$(dd if="$src" of="$dev" bs="$len" count=1 seek="$off" oflag=seek_bytes,direct conv=notrunc status=none 2>&1)
		else
			msg=$(dd if="$src" of="$dev" bs="$len" count=1 seek="$off" oflag=seek_bytes conv=notrunc,fsync status=none 2>&1)
		fi
		rc=$?
		read -r t1 _ < /proc/uptime
		extra="pat=$pat"
		;;
	*)
		rc=1 msg="init: unknown operation: $op" t1=$t0 dev=- off=0 len=0 extra=""
		;;
	esac
	kmsg $i 6
	[ -z "$msg" ] || msg=$(oneline "$msg")
	err=""
	[ $rc -eq 0 ] || err=$(errno_text "$msg")
	echo "CBW-RESULT i=$i op=$kind dev=$dev off=$off len=$len rc=$rc t0=$t0 t1=$t1 $extra err=\"$err\" msg=\"$msg\""
	i=$((i + 1))
done

echo "CBW-DONE ops=$i t=$(uptime_s)"
# No sync: a failing disk could hang it.  -f: we are init, there is nothing to stop.
# Without ACPI (acpi=off) power-off would just halt: reset instead, which ends QEMU
# when it runs with -no-reboot.
[ -d /sys/firmware/acpi/tables ] && poweroff -f
reboot -f
