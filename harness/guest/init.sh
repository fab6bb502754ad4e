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
#                                             (i=-1: an error logged during boot, printed
#                                             before CBW-READY; the others after the plan)
#   CBW-KLOST i=N                             the kernel log overwrote records before they
#                                             were read: those up to op N's end are lost
#   CBW-DONE ops=N t=UPTIME                   the plan is over; power off follows
# Parameters: cbw.ops=OP,OP,...  cbw.wait=SECONDS (disk wait, default 10).
# OP (short: the kernel command line holds 2047 bytes): r:DEV:OFF:LEN (read) |
# w:DEV:OFF:LEN:HEX (O_DIRECT write) | f:DEV:OFF:LEN:HEX (buffered write + fsync);
# DEV is the disk's path under /dev/, OFF and LEN in bytes, HEX the byte written.
# CBW-RESULT names them in full: op=read|write|fsyncwrite dev=/dev/DEV.
# Under TCG each process costs the guest ~17 ms (and a busybox applet that is not
# NOEXEC pays an exec besides the fork): an operation runs its dd, and a read its md5sum
# (and xxd for content not read before); everything else is shell builtins.

/bin/busybox --install -s /bin
export PATH=/bin
set -f  # operation tokens are split on ':' and ','; never glob them
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

read -r cmdline < /proc/cmdline
# Sets v to the value of kernel parameter $1; the last occurrence wins, as for the
# kernel's own.
param() {
	v=""
	for w in $cmdline; do
		case $w in "$1="*) v=${w#*=} ;; esac
	done
}

# Sets cs to the uptime in centiseconds, for deadlines ("0.05" -> 5, not octal 05).
uptime_cs() {
	read -r up _ < /proc/uptime
	f=${up#*.}
	cs=$((${up%.*} * 100 + ${f#0}))
}

# Sets msg to a command's error output ($1: the file it went to) on one line without
# double quotes (safe inside err="..." / msg="..."), and recs to the "N+M records out"
# count of a dd.
output_of() {
	msg="" recs=""
	while IFS= read -r line || [ -n "$line" ]; do  # a last line may lack its newline
		case $line in
		*" records in") ;;
		*" records out") recs=${line%% *} ;;
		*) msg="$msg${msg:+ }$line" ;;
		esac
	done < "$1"
	no_quotes
}

# Replaces each double quote in msg with a single one.
no_quotes() {
	while case $msg in *\"*) ;; *) false ;; esac; do
		msg="${msg%%\"*}'${msg#*\"}"
	done
}

# Sets first to the first 16 bytes of file $1, in hex, given $2, its md5.  Equal md5,
# equal bytes (the host trusts md5 as much): xxd runs once per content, not once per
# read, and most reads see one of a few patterns.
first_bytes() {
	eval "known=\${head_$2+y} first=\${head_$2-}"
	[ -n "$known" ] || { first=$(xxd -p -l 16 "$1"); eval "head_$2=\$first"; }
}

# The boot's kernel errors (levels 0..3), as CBW-KMSG lines of operation -1.  dmesg -c
# marks the log read: the end of the plan reads only what was logged after this.  (The
# console itself shows only emergencies: loglevel=1, so our lines stay whole.)
boot_kmsg() {
	k=$(dmesg -c -r)
	[ -z "$k" ] || echo "$k" | sed -n "s/^<\([0-3]\)>\[ *\([0-9.]*\)\] /CBW-KMSG i=-1 lvl=\1 t=\2 /p"
}

# Marks the end of operation $1 in the kernel log, for kmsg.awk to cut the log at; a
# write to /dev/kmsg, not a process (each open has its own rate limit: one record).
end_mark() {
	echo "<7>cbw-end $1" > /dev/kmsg
}

# A file of LEN bytes all equal to the byte HEX, made once per (len, byte).
pattern_file() {
	f=/tmp/pat-$1-$2
	[ -f "$f" ] || head -c "$1" /dev/zero | tr '\000' "\\$(printf %03o "0x$2")" > "$f"
	echo "$f"
}

while read -r ko; do
	insmod "$ko" > /tmp/err 2>&1 && continue
	output_of /tmp/err
	name=${ko##*/}
	echo "CBW-MODFAIL module=${name%.ko} err=\"$msg\""
done < /etc/cbw/modules

param cbw.ops
ops=$v
param cbw.wait
wait_s=${v:-10}
oldifs=$IFS; IFS=,; set -- $ops; IFS=$oldifs
ops=$*

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
uptime_cs
deadline=$((cs + wait_s * 100))
for d in $devs; do
	while [ ! -b "$d" ] && uptime_cs && [ $cs -lt $deadline ]; do
		sleep 0.05
	done
	[ -b "$d" ] || echo "CBW-NODEV dev=$d waited=$wait_s"
done

read -r start _ < /proc/uptime
boot_kmsg
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
		dd if="$dev" of=/tmp/rd bs="$len" count=1 skip="$off" iflag=skip_bytes,direct status=noxfer 2>/tmp/err
		rc=$?
		read -r t1 _ < /proc/uptime
		output_of /tmp/err
		# One whole record of bs=LEN bytes out, or none; anything else (a short read
		# at the disk's end, or no count printed) is counted.
		case $recs in 1+0) got=$len ;; 0+0) got=0 ;; *) got=$(wc -c < /tmp/rd) ;; esac
		md5sum /tmp/rd > /tmp/md5
		read -r md5 _ < /tmp/md5
		first_bytes /tmp/rd "$md5"
		# Whether every byte equals the first: the host tells from md5 (one cmp and
		# one pattern file less per read; each process costs ~17 ms under TCG).
		extra="got=$got md5=$md5 head=$first"
		;;
	write|fsyncwrite)
		src=/tmp/pat-$len-$pat  # made before the plan (pattern_file)
		if [ "$kind" = write ]; then
			dd if="$src" of="$dev" bs="$len" count=1 seek="$off" oflag=seek_bytes,direct conv=notrunc status=none 2>/tmp/err
		else
			dd if="$src" of="$dev" bs="$len" count=1 seek="$off" oflag=seek_bytes conv=notrunc,fsync status=none 2>/tmp/err
		fi
		rc=$?
		read -r t1 _ < /proc/uptime
		output_of /tmp/err
		extra="pat=$pat"
		;;
	*)
		rc=1 msg="init: unknown operation: $op" t1=$t0 dev=- off=0 len=0 extra=""
		no_quotes
		;;
	esac
	end_mark $i
	err=""
	# "dd: error writing '/dev/vda': Input/output error" -> "Input/output error"
	[ $rc -eq 0 ] || err=${msg##*: }
	echo "CBW-RESULT i=$i op=$kind dev=$dev off=$off len=$len rc=$rc t0=$t0 t1=$t1 $extra err=\"$err\" msg=\"$msg\""
	i=$((i + 1))
done

# The kernel messages of every operation, cut at the end marks (kmsg.awk).
dmesg -c -r | awk -f /etc/cbw/kmsg.awk
read -r done_t _ < /proc/uptime
echo "CBW-DONE ops=$i t=$done_t"
# Wait until the console has sent all of it: a reset drops what is still queued in the
# tty (seen: the kernel messages printed in a burst after the plan, and CBW-DONE, cut
# off).  stty sets its (unchanged) mode with TCSADRAIN, which waits for the transmitter.
stty onlcr
# No sync: a failing disk could hang it.  -f: we are init, there is nothing to stop.
# Without ACPI (acpi=off) power-off would just halt: reset instead, which ends QEMU
# when it runs with -no-reboot.
[ -d /sys/firmware/acpi/tables ] && poweroff -f
reboot -f
