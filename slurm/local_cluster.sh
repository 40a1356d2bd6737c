#!/usr/bin/env bash
# A real single-node Slurm (Debian packages, Slurm 22.05+) on localhost, for tests and laptops.
# usage: slurm/local_cluster.sh install|start|stop|env
#   install  apt-get the daemons (root; once per machine)
#   start    munged + mariadb + slurmdbd + slurmctld + slurmd, all state under $SLURM_DIR
#   stop     cancel jobs, wait for the queue to drain, then stop the daemons (TERM, then KILL)
#   env      print the export line clients need
# Then: eval "$(slurm/local_cluster.sh env)"; python benchmarks/run.py --suite NAME --profile slurm/local.yaml
#   SLURM_DIR  (default ${TMPDIR:-/tmp}/local-slurm)  all config/state/logs/pids/sockets live here
#   SLURM_AUTH (munge|none, default munge)
#   SLURM_DBD  (1|0, default 1): slurmdbd+mariadb so that `sacct` (used by submitit) works
# Clients (sbatch/srun/sacct/submitit) need:  export SLURM_CONF=$SLURM_DIR/etc/slurm.conf
set -euo pipefail
D=${SLURM_DIR:-${TMPDIR:-/tmp}/local-slurm}
AUTH=${SLURM_AUTH:-munge}
DBD=${SLURM_DBD:-1}
export SLURM_CONF=$D/etc/slurm.conf

log() { echo "[$(date +%T.%3N)] $*"; }

install() {
  apt-get update -q
  local pkgs="slurmctld slurmd slurm-client munge"
  [ "$DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  # policy-rc.d / no systemd: postinst does not start services, which is what we want
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
}

bg() {  # bg NAME CMD...   start a foreground-mode daemon detached, record its PID
  local name=$1; shift
  setsid "$@" >"$D/log/$name.out" 2>&1 </dev/null &
  echo $! >"$D/pids/$name.pid"
  echo "$name" >>"$D/pids/order"
}

wait_for() {  # wait_for SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && { log "timeout waiting for: $*"; return 1; }
    sleep 0.2
  done
}

node_idle() { [ "$(sinfo -h -n localhost -o %T)" = idle ]; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  [ -e "$D/pids/order" ] && { echo "already started? run stop first"; exit 1; }
  for port in 6817 6818 6819; do  # a second cluster on this host would half-start and die on bind
    port_free "$port" || { echo "port $port is in use: another Slurm runs on this host; stop it" \
      "(SLURM_DIR=its folder slurm/local_cluster.sh stop) or use it (export its SLURM_CONF)" >&2; exit 2; }
  done
  rm -rf "$D"; mkdir -p "$D"/{etc,state,spool,log,run,pids}
  chmod 755 "$D" "$D/run"
  local authinfo=""
  if [ "$AUTH" = munge ]; then
    dd if=/dev/urandom of="$D/etc/munge.key" bs=1024 count=1 status=none
    chmod 600 "$D/etc/munge.key"
    bg munged munged -F --force --key-file="$D/etc/munge.key" --socket="$D/run/munge.sock" \
        --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/run/munged.seed"
    authinfo="AuthInfo=socket=$D/run/munge.sock"
    wait_for 10 munge -n -S "$D/run/munge.sock"
  fi
  # exact hardware line of this machine, renamed to localhost
  local node; node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=localhost/")
  local acct="AccountingStorageType=accounting_storage/none"
  [ "$DBD" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
  [ "$DBD" = 1 ] && [ "$AUTH" = munge ] && acct="$acct
AccountingStoragePass=$D/run/munge.sock"   # munge socket for the slurmctld->slurmdbd connection
  cat >"$SLURM_CONF" <<EOF
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
$authinfo
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$DBD" = 1 ]; then
    mkdir -p "$D/mysql" "$D/run/mysqld"; chown mysql:mysql "$D/mysql" "$D/run/mysqld"
    export MYSQL_UNIX_PORT=$D/run/mysqld/mysqld.sock   # libmariadb (slurmdbd) honours this
    mariadb-install-db --user=mysql --datadir="$D/mysql" --auth-root-authentication-method=socket \
        --skip-test-db >"$D/log/mariadb-install.log" 2>&1
    bg mariadb mariadbd --no-defaults --user=mysql --datadir="$D/mysql" --socket="$MYSQL_UNIX_PORT" \
        --pid-file="$D/run/mysqld/mysqld.pid" --skip-networking --innodb-buffer-pool-size=64M \
        --innodb-lock-wait-timeout=900
    wait_for 30 mariadb --socket="$MYSQL_UNIX_PORT" -e 'select 1'
    mariadb --socket="$MYSQL_UNIX_PORT" -e "CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat >"$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/$AUTH
$authinfo
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable config
    bg slurmdbd slurmdbd -D             # finds slurmdbd.conf next to $SLURM_CONF
    wait_for 30 grep -q "slurmdbd version .* started" "$D/log/slurmdbd.log"
  fi
  bg slurmctld slurmctld -D -i
  bg slurmd slurmd -D -N localhost     # -N: node name is not the machine's hostname
  wait_for 30 node_idle
  [ "$DBD" = 1 ] && wait_for 30 sacct -n -X
  log "cluster up"; sinfo
}

stop() {
  [ -e "$D/pids/order" ] || { echo "not started"; return 0; }
  # cancel jobs first: slurmstepd daemonizes and would outlive slurmd
  local jobs=""
  [ -e "$D/pids/slurmctld.pid" ] && kill -0 "$(cat "$D/pids/slurmctld.pid")" 2>/dev/null && jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then scancel $jobs || true; wait_for 20 sh -c '[ -z "$(squeue -h -o %A)" ]' || true; fi
  for name in $(tac "$D/pids/order"); do          # reverse start order, TERM all at once
    kill -TERM "$(cat "$D/pids/$name.pid")" 2>/dev/null || true
  done
  for name in $(tac "$D/pids/order"); do
    local pid; pid=$(cat "$D/pids/$name.pid")
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "KILL $name $pid"; kill -KILL "$pid" || true; }
  done
  rm -f "$D/pids/order"
  log "cluster stopped"
}

env() { echo "export SLURM_CONF=$SLURM_CONF"; }

"$@"
