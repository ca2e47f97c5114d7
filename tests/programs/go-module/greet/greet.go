// Package greet says hello to a list of names.
package greet

import "strings"

// Everyone greets each name, or the world when there are none.
func Everyone(names []string) string {
	if len(names) == 0 {
		return "hello, world"
	}
	return "hello, " + strings.Join(names, " and ")
}
