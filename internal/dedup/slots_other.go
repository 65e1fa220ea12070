//go:build !linux

package dedup

func allocSlots(n int) []slot { return make([]slot, n) }

func freeSlots([]slot) {}
