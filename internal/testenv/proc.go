package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procStat reads the state and the parent of process pid from /proc/<pid>/stat; ok is false
// when there is no such process.
func procStat(pid int) (state string, ppid int, ok bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, false
	}
	// pid (comm) state ppid …; comm may hold spaces and parentheses.
	end := strings.LastIndexByte(string(data), ')')
	if end < 0 {
		return "", 0, false
	}
	f := strings.Fields(string(data[end+1:]))
	if len(f) < 2 {
		return "", 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return f[0], ppid, err == nil
}

// children maps each process to its children that have not ended, from /proc/*/stat.
func children() map[int][]int {
	out := map[int][]int{}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range stats {
		pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(path, "/proc/"), "/stat"))
		if err != nil {
			continue
		}
		if state, ppid, ok := procStat(pid); ok && !ended(state) {
			out[ppid] = append(out[ppid], pid)
		}
	}
	return out
}

// Children are the processes whose parent is pid and that have not ended (a flowpipe
// host's plugin processes, say).
func Children(pid int) []int { return children()[pid] }

// processTree is pid and its descendants that have not ended.
func processTree(pid int) []int {
	kids := children()
	tree := []int{pid}
	for i := 0; i < len(tree); i++ {
		tree = append(tree, kids[tree[i]]...)
	}
	return tree
}

// KillTree kills pid and its descendants with SIGKILL, all at once (a crash of a flowpipe host
// with its plugin processes, an OOM kill of its unit), and waits until every one has ended,
// so that what they held is free: a restart on the same port does not find it still held by
// a plugin process that was about to die. The bound only keeps a broken test from hanging.
func KillTree(pid int, within time.Duration) error {
	tree := processTree(pid)
	for _, p := range tree {
		syscall.Kill(p, syscall.SIGKILL)
	}
	deadline := time.Now().Add(within)
	for _, p := range tree {
		for Alive(p) {
			if time.Now().After(deadline) {
				return fmt.Errorf("process %d (of %d's tree) still running %s after SIGKILL", p, pid, within)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// Alive says whether process pid exists and has not ended. A zombie, ended but not yet
// reaped, counts as ended once it is the last of its threads: a killed Go process's main
// thread shows "Z" while its other threads are still exiting, and those still hold the
// process's descriptors (a listening socket, so its port cannot be bound yet).
func Alive(pid int) bool {
	state, _, ok := procStat(pid)
	if !ok {
		return false
	}
	if !ended(state) {
		return true
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	return err == nil && len(tasks) > 1
}

func ended(state string) bool { return state == "Z" || state == "X" }
