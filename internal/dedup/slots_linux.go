package dedup

import (
	"sync"
	"syscall"
	"unsafe"
)

// hugeSlots is the table size from which slots live in memory of their own, mapped with
// transparent huge pages: a table of a million IDs spans tens of megabytes hit at random
// by every event, and with 4 KiB pages nearly every access also misses the TLB (which in a
// virtual machine costs a two-level page walk). Smaller tables are ordinary Go memory.
const hugeSlots = 1 << 17 // 2.5 MiB

var mapped sync.Map // *slot of a mapped array → its bytes, for freeSlots

// allocSlots returns n zeroed slots.
func allocSlots(n int) []slot {
	size := n * int(unsafe.Sizeof(slot{}))
	if n < hugeSlots {
		return make([]slot, n)
	}
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return make([]slot, n)
	}
	_ = syscall.Madvise(mem, 14 /* MADV_HUGEPAGE */)
	s := unsafe.Slice((*slot)(unsafe.Pointer(&mem[0])), n)
	mapped.Store(&s[0], mem)
	return s
}

// freeSlots gives back slots from allocSlots that nothing uses any more.
func freeSlots(s []slot) {
	if len(s) < hugeSlots {
		return
	}
	if mem, ok := mapped.LoadAndDelete(&s[0]); ok {
		_ = syscall.Munmap(mem.([]byte))
	}
}
